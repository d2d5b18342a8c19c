"""Classify your own pictures with a trained MyModel (lesson P31).

    python test.py                                   # images/dog.png with the newest checkpoint in model/
    python test.py images/cat.jpg my_photos/ --checkpoint model/best.pth --top-k 5
    python test.py --eval --checkpoint model/best.pth   # per-class accuracy, confusion matrix, mistakes
    python test.py --json                            # machine-readable, for any of the above

Any size or format Pillow reads (PNG, JPEG, GIF, WebP, BMP, TIFF ...) is shrunk to 32x32 as CIFAR-10
images are, then normalised with the statistics the checkpoint was trained with (--recipe fast).
Checkpoints load with map_location (a GPU-trained model works on a CPU-only machine) and
weights_only=True (a checkpoint can never run code). A folder argument means every image in it.
"""
import argparse
import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms

from training.checkpoint import build_model, class_names, load_checkpoint, newest_checkpoint
from training.cli import ArgumentParser, positive_int, run
from training.data import CHINESE_NAMES, IMAGE_SIZE, load_data
from training.device import select_device
from training.errors import UserError
from training.recipe import inference_net
from training.report import evaluation_report, format_report

IMAGE_SUFFIXES = {'.png', '.jpg', '.jpeg', '.gif', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm'}
PREPROCESS = transforms.Compose([transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor()])


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: transparency over white, 16-bit scaled (not clipped), CMYK converted."""
    if image.mode.startswith('I'):  # 16/32-bit grayscale: scale 0..65535 to 0..255
        pixels = np.asarray(image, dtype=np.float64) / 65535 * 255
        image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    elif image.mode == 'F':
        image = Image.fromarray((np.asarray(image) * 255).clip(0, 255).round().astype(np.uint8))
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return image.convert('RGB')


def load_image(path: Path) -> torch.Tensor:
    """One image file -> a 3x32x32 float tensor in [0, 1], exactly as training saw its images."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)  # phone photos: upright, as they are shown
                return PREPROCESS(to_rgb(image))
    except FileNotFoundError:
        raise UserError(f'{path}: no such file') from None
    except IsADirectoryError:
        raise UserError(f'{path} is a folder') from None
    except UnidentifiedImageError:
        raise UserError(f'{path}: not an image Pillow can read (empty, damaged, or a format such as HEIC: '
                        f'convert it to PNG or JPEG)') from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        pixels = re.search(r'(\d+) pixels', str(e))
        raise UserError(f'{path}: refused: {int(pixels[1]) if pixels else 0:,} pixels, more than the '
                        f'{Image.MAX_IMAGE_PIXELS:,} Pillow opens safely; it could be a decompression bomb, '
                        f'so shrink it first') from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, bad headers
        raise UserError(f'{path}: damaged or truncated image ({e})') from None


def image_paths(args_images) -> list:
    """Files as given; folders expanded to the images inside them (sorted)."""
    paths = []
    for name in args_images:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f'{path}/ holds no images ({", ".join(sorted(IMAGE_SUFFIXES))})')
            paths += found
        elif not path.exists():
            raise UserError(f'{path}: no such file or folder')
        else:
            paths.append(path)
    return paths


def display_name(name: str) -> str:
    return f'{name} {CHINESE_NAMES[name]}' if name in CHINESE_NAMES else name


def classify(model, classes, paths, device, top_k: int) -> list:
    """[{'image', 'top': [{'class', 'chinese', 'probability'}, ...]}] for each image, best guess first."""
    images = torch.stack([load_image(p) for p in paths]).to(device)
    model.eval()
    with torch.no_grad():
        probabilities = model(images).float().softmax(dim=1).cpu()
    top_p, top_i = probabilities.topk(min(top_k, len(classes)), dim=1)
    return [{'image': str(path), 'top': [{'class': classes[i], 'chinese': CHINESE_NAMES.get(classes[i]),
                                          'probability': p} for p, i in zip(ps, idx)]}
            for path, ps, idx in zip(paths, top_p.tolist(), top_i.tolist())]


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', nargs='*', help='image files or folders (default: images/dog.png)')
    parser.add_argument('--checkpoint', help='a .pth file (default: the newest one in --checkpoint-dir)')
    parser.add_argument('--checkpoint-dir', default='model', help='where to look for checkpoints (default: model)')
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto',
                        help='auto picks cuda, then mps, then cpu (default: auto)')
    parser.add_argument('--top-k', type=positive_int, default=3, help='how many guesses to show (default: 3)')
    parser.add_argument('--eval', action='store_true',
                        help='instead of images: accuracy per class, confusion matrix and the most confident '
                             'mistakes on the test split of --data-dir')
    parser.add_argument('--data-dir', default='dataset', help='data set for --eval, as for training (default: dataset)')
    parser.add_argument('--json', action='store_true', help='print one JSON document instead of text')
    parser.add_argument('--tta', action=argparse.BooleanOptionalAction,
                        help='also look at the mirror image and average (default: as the checkpoint was trained, '
                             'on for --recipe fast)')
    args = parser.parse_args(argv)
    if args.eval and args.images:
        parser.error('--eval evaluates the test split: give no image arguments with it')

    device = select_device(args.device)
    paths = [] if args.eval else image_paths(args.images or ['images/dog.png'])
    checkpoint_path = Path(args.checkpoint) if args.checkpoint else newest_checkpoint(args.checkpoint_dir)
    checkpoint = load_checkpoint(checkpoint_path, device)
    model = build_model(checkpoint['model'], source=str(checkpoint_path))
    classes = class_names(checkpoint, model.model[-1].out_features)
    tta = args.tta if args.tta is not None else bool(checkpoint.get('config', {}).get('tta'))
    net = inference_net(model, checkpoint.get('normalize'), tta).to(device)  # normalisation, model, mirror
    if args.eval:
        report = evaluation_report(net, classes, load_data(args.data_dir), device, str(checkpoint_path))
        print(json.dumps(report, ensure_ascii=False) if args.json else format_report(report))
        return
    predictions = classify(net, classes, paths, device, args.top_k)
    if args.json:
        print(json.dumps({'checkpoint': str(checkpoint_path), 'device': str(device), 'classes': classes,
                          'normalize': checkpoint.get('normalize'), 'tta': tta, 'predictions': predictions},
                         ensure_ascii=False))
        return
    about = f', epoch {checkpoint["epoch"] + 1}, test accuracy {checkpoint["test_accuracy"]:.1%}' \
        if checkpoint.get('test_accuracy') is not None else ''
    extras = ''.join(['; normalised as in training' if checkpoint.get('normalize') else '',
                      '; with its mirror image (TTA)' if tta else ''])
    print(f'checkpoint: {checkpoint_path} ({len(classes)} classes{about}); device: {device}{extras}')
    for prediction in predictions:
        best = prediction['top'][0]
        guesses = ', '.join(f'{display_name(t["class"])} {t["probability"]:.1%}' for t in prediction['top'])
        print(f'{prediction["image"]}: {display_name(best["class"])} ({best["probability"]:.1%})   '
              f'top {len(prediction["top"])}: {guesses}')


if __name__ == '__main__':
    run(main)
