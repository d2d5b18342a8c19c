"""Classify your own pictures with a trained MyModel (lesson P31).

    python test.py                                   # images/dog.png with the newest checkpoint in model/
    python test.py images/cat.jpg my_photos/ --checkpoint model/best.pth --top-k 5
    python test.py --eval --checkpoint model/best.pth   # per-class accuracy, confusion matrix, mistakes
    python test.py --json                            # machine-readable, for any of the above
    python test.py images/ --explain explained/      # a picture per image: what the model saw, and where
    python test.py --checkpoint tudui_29_gpu.pth --convert tudui_29.pth   # a lessons' whole-model file

Any size or format Pillow reads (PNG, JPEG, GIF, WebP, BMP, TIFF ...) is shrunk to 32x32 as CIFAR-10
images are, then normalised with the statistics the checkpoint was trained with (--recipe fast).
Checkpoints load with map_location (a GPU-trained model works on a CPU-only machine) and
weights_only=True (a checkpoint can never run code), also the whole models the lessons save with
torch.save(tudui, ...): their weights are read without the class Tudui and without running any code.
A folder argument means every image in it.
"""
import argparse
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms

from training.checkpoint import build_model, class_names, load_checkpoint, newest_checkpoint
from training.cli import ArgumentParser, positive_int, run
from training.console import json_text
from training.data import CHINESE_NAMES, IMAGE_SIZE, hidden, image_suffixes, load_data
from training.device import device_note, select_device
from training.errors import UserError
from training.paths import project_path
from training.explain import write_explanations
from training.files import atomic_save
from training.recipe import Normalize, Views, describe_views, inference_net
from training.report import evaluation_report, evaluation_settings, format_report

UNSURE = 0.5  # a top probability below this: say that the model is unsure
PREPROCESS = transforms.Compose([transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor()])


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: transparency over white, 16-bit scaled (not clipped), CMYK converted."""
    if image.mode.startswith('I'):  # 16/32-bit grayscale: scale 0..65535 to 0..255
        pixels = np.asarray(image, dtype=np.float64) / 65535 * 255
        image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    elif image.mode == 'F':
        image = Image.fromarray((np.asarray(image) * 255).clip(0, 255).round().astype(np.uint8))
    if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:  # (a palette, grey or RGB PNG's tRNS)
        rgba = image.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return image.convert('RGB')


def load_image(path: Path) -> torch.Tensor:
    """One image file -> a 3x32x32 float tensor in [0, 1], exactly as training saw its images."""
    return PREPROCESS(load_picture(path))


def load_picture(path: Path) -> Image.Image:
    """One image file, upright and in RGB, at its own size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)  # phone photos: upright, as they are shown
                return to_rgb(image)
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
    paths, suffixes = [], image_suffixes()
    for name in args_images:
        path = Path(name)
        if path.is_dir():  # (not the ._cat.jpg files a Mac leaves beside its pictures, see hidden())
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and not hidden(p.name)
                           and p.is_file())
            if not found:
                raise UserError(f'{path}/ holds no images ({", ".join(sorted(suffixes))})')
            paths += found
        elif not path.exists():
            raise UserError(f'{path}: no such file or folder')
        else:
            paths.append(path)
    return paths


def display_name(name: str) -> str:
    return f'{name} {CHINESE_NAMES[name]}' if name in CHINESE_NAMES else name


def classify(model, classes, images, paths, device, top_k: int) -> list:
    """[{'image', 'top': [{'class', 'index', 'chinese', 'probability'}, ...]}] for each image, best guess first."""
    images = images.to(device)
    model.eval()
    with torch.no_grad():
        probabilities = model(images).float().softmax(dim=1).cpu()
    top_p, top_i = probabilities.topk(min(top_k, len(classes)), dim=1)
    return [{'image': str(path), 'top': [{'class': classes[i], 'index': i, 'chinese': CHINESE_NAMES.get(classes[i]),
                                          'probability': p} for p, i in zip(ps, idx)]}
            for path, ps, idx in zip(paths, top_p.tolist(), top_i.tolist())]


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', nargs='*', help="image files or folders (default: the project's images/dog.png)")
    parser.add_argument('--checkpoint', help='a .pth file (default: the newest one in --checkpoint-dir)')
    parser.add_argument('--checkpoint-dir', default=project_path('model'),
                        help="where to look for checkpoints (default: the project's model/)")
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto',
                        help='auto picks cuda, then mps, then cpu (default: auto)')
    parser.add_argument('--top-k', type=positive_int, default=3, help='how many guesses to show (default: 3)')
    parser.add_argument('--eval', action='store_true',
                        help='instead of images: accuracy per class, confusion matrix and the most confident '
                             'mistakes on the test split of --data-dir')
    parser.add_argument('--data-dir', default=None,
                        help="data set for --eval, as for training (default: the project's dataset/)")
    parser.add_argument('--precision', choices=['auto', 'fp32', 'bf16', 'fp16'],
                        help="--eval's arithmetic (default: the checkpoint's own, as its training run evaluated)")
    parser.add_argument('--json', action='store_true', help='print one JSON document instead of text')
    parser.add_argument('--tta', action=argparse.BooleanOptionalAction,
                        help='also look at the mirror image (and the moved copies, as the checkpoint\'s run was '
                             'tested) and average (default: as the checkpoint was trained, on for --recipe fast)')
    parser.add_argument('--explain', metavar='DIR',
                        help='also write DIR/<image>.explain.png for each image: the picture, the 32x32 image the '
                             'model gets, a Grad-CAM heat map of where it saw the top class, the top-k bars')
    parser.add_argument('--convert', metavar='OUT',
                        help="instead of classifying: save the checkpoint's weights as a plain state_dict in OUT "
                             "(for a lessons' whole-model file: then torch.load(OUT, weights_only=True) reads it)")
    args = parser.parse_args(argv)
    if args.eval and args.images:
        parser.error('--eval evaluates the test split: give no image arguments with it')
    if args.convert and (args.images or args.eval or args.explain):
        parser.error('--convert only converts the --checkpoint: give no images, --eval or --explain with it')
    if args.convert and not args.checkpoint:
        parser.error('--convert needs --checkpoint FILE: the file to convert')
    if args.convert:
        return convert(Path(args.checkpoint), Path(args.convert))

    device = select_device(args.device)
    paths = [] if args.eval else image_paths(args.images or [project_path('images', 'dog.png')])
    checkpoint_path = Path(args.checkpoint) if args.checkpoint else newest_checkpoint(args.checkpoint_dir)
    checkpoint = load_checkpoint(checkpoint_path, device)
    model = build_model(checkpoint['model'], source=str(checkpoint_path))
    classes = class_names(checkpoint, model.model[-1].out_features)
    config = checkpoint.get('config', {})
    tta = args.tta if args.tta is not None else bool(config.get('tta'))
    views = Views.saved(config) if tta else None  # the views its run was tested on
    net = inference_net(model, checkpoint.get('normalize'), views).to(device)  # normalising, model, views
    if args.eval:
        how = evaluation_settings(checkpoint, args.precision)
        report = evaluation_report(net, classes, load_data(args.data_dir), device, str(checkpoint_path), how)
        print(json_text(report) if args.json else format_report(report))
        return
    pictures = [(path, load_picture(path)) for path in paths]
    images = torch.stack([PREPROCESS(picture) for _, picture in pictures])
    predictions = classify(net, classes, images, paths, device, args.top_k)
    if args.explain:  # Grad-CAM looks at the model itself (no mirror image), on the CPU
        normalize = Normalize(**checkpoint['normalize']) if checkpoint.get('normalize') else None
        explained = write_explanations(model.cpu(), normalize, pictures, images, predictions, args.explain)
    if args.json:
        print(json_text({'checkpoint': str(checkpoint_path), 'device': str(device), 'classes': classes,
                         'normalize': checkpoint.get('normalize'), 'tta': tta,
                         **(views or Views(1, 0, False))._asdict(), 'predictions': predictions}))
        return
    about = f', epoch {checkpoint["epoch"] + 1}, test accuracy {checkpoint["test_accuracy"]:.1%}' \
        if checkpoint.get('test_accuracy') is not None else ''
    extras = ''.join(['; normalised as in training' if checkpoint.get('normalize') else '',
                      f'; with {describe_views(views)} (TTA)' if tta else ''])
    whole = checkpoint.get('whole_model')
    kind = f'a whole {whole["class"]} model as the lessons save it, its weights read without running its code; ' \
        if whole else ''
    print(f'checkpoint: {checkpoint_path} ({kind}{len(classes)} classes{about}); device: {device}{extras}'
          f'{device_note(device)}')
    unsure = []
    for prediction in predictions:
        best = prediction['top'][0]
        guesses = ', '.join(f'{display_name(t["class"])} {t["probability"]:.1%}' for t in prediction['top'])
        print(f'{prediction["image"]}: {display_name(best["class"])} ({best["probability"]:.1%})   '
              f'top {len(prediction["top"])}: {guesses}')
        if best['probability'] < UNSURE:
            unsure.append(Path(prediction['image']).name)
    if unsure:
        print(f'note: the model is unsure about {", ".join(unsure[:5])}{" ..." if len(unsure) > 5 else ""} (top '
              f'guess under {UNSURE:.0%}): a CIFAR-10 model knows {len(classes)} kinds of object, seen as 32x32 '
              f'thumbnails where the object fills the frame; other things, or small objects in a large photo, '
              f'only get its nearest guess')
    if args.explain:
        print(f'explained: {", ".join(str(p) for p in explained)}')


def convert(source: Path, target: Path) -> None:
    """--convert: the checkpoint's weights as a plain MyModel state_dict in ``target`` (never over a file)."""
    if target.exists():
        raise UserError(f'--convert: {target} already exists; give a new file name (nothing was overwritten)')
    checkpoint = load_checkpoint(source, 'cpu')
    model = build_model(checkpoint['model'], source=str(source))
    try:
        atomic_save(model.state_dict(), target)
    except OSError as e:
        raise UserError(f'--convert: cannot write {target} ({e.strerror or e})') from None
    note = '; it was trained on normalised images, which a plain state_dict does not record: keep using ' \
        f'{source} with test.py' if checkpoint.get('normalize') else ''
    print(f'converted {source} -> {target}: a plain state_dict with MyModel\'s keys '
          f'(torch.load(\'{target}\', weights_only=True) reads it){note}')


if __name__ == '__main__':
    run(main)
