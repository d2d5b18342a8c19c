"""What a training run shows in TensorBoard, beyond the tutorial's three scalars.

Step units, one per tag: ``train_loss`` uses the training step (batches since the start, as the
tutorial's ``total_train_step``); every other scalar, image and histogram uses the epoch (from 0).
Everything here runs once per epoch or once per run, never per step, and needs no extra device sync.
"""
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw

CELL = 30  # pixels per confusion-matrix cell


def _text_width(draw, text) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text)
    return right - left


def confusion_image(confusion: torch.Tensor, classes) -> np.ndarray:
    """A confusion matrix as an RGB picture (rows: true class, columns: predicted; darker = more of the row)."""
    n = len(classes)
    names = [name[:10] for name in classes]
    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    margin = max(_text_width(probe, name) for name in names) + 8
    image = Image.new('RGB', (margin + n * CELL + 4, margin + n * CELL + 4), 'white')
    draw = ImageDraw.Draw(image)
    share = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    for i in range(n):
        draw.text((4, margin + i * CELL + CELL // 3), names[i], fill='black')
        column_label = Image.new('RGB', (margin, CELL), 'white')  # written sideways above its column
        ImageDraw.Draw(column_label).text((4, CELL // 3), names[i], fill='black')
        image.paste(column_label.rotate(90, expand=True), (margin + i * CELL, 0))
        for j in range(n):
            shade = int(255 * (1 - share[i, j].item()))
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            box = (margin + j * CELL, margin + i * CELL, margin + (j + 1) * CELL - 1, margin + (i + 1) * CELL - 1)
            draw.rectangle(box, fill=colour, outline=(220, 220, 220))
            count = str(int(confusion[i, j]))
            draw.text((box[0] + (CELL - _text_width(draw, count)) // 2, box[1] + CELL // 3), count,
                      fill='white' if shade < 110 else 'black')
    return np.asarray(image)


def labelled_grid(dataset, classes, count: int = 32, per_row: int = 8, scale: int = 2) -> np.ndarray:
    """``count`` training images spread over the data set, enlarged, each with its class name below."""
    indices = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).long().tolist()
    side, label_height = 32 * scale, 14
    rows = math.ceil(len(indices) / per_row)
    grid = Image.new('RGB', (per_row * (side + 4), rows * (side + label_height + 4)), 'white')
    draw = ImageDraw.Draw(grid)
    for k, index in enumerate(indices):
        image, label = dataset[index]
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        x, y = (k % per_row) * (side + 4), (k // per_row) * (side + label_height + 4)
        grid.paste(Image.fromarray(pixels).resize((side, side), Image.NEAREST), (x, y))
        draw.text((x, y + side + 1), classes[label][:10], fill='black')
    return np.asarray(grid)


def log_run_start(writer, model, dataset, classes, example: torch.Tensor) -> None:
    """Once per run: sample training images with their labels, and the model's graph."""
    writer.add_image('train_samples', labelled_grid(dataset, classes), 0, dataformats='HWC')
    try:
        with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns that it is deprecated
            warnings.simplefilter('ignore', FutureWarning)
            writer.add_graph(model, example)
    except Exception as e:  # tracing is a nicety; never let it stop training
        print(f'note: the model graph was not logged ({type(e).__name__}: {e})')


def log_epoch(writer, epoch: int, model, train, test, classes, seconds: float) -> None:
    """Per epoch: time, speed, train accuracy, per-class accuracy, confusion matrix,
    and histograms of the weights and of the last step's gradients."""
    writer.add_scalar('epoch_seconds', seconds, epoch)
    writer.add_scalar('images_per_second', train.images / max(seconds, 1e-9), epoch)
    writer.add_scalar('train_accuracy', train.accuracy, epoch)
    writer.add_scalar('train_loss_epoch', train.loss, epoch)
    confusion = test.confusion
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1)
    for name, accuracy in zip(classes, per_class.tolist()):
        writer.add_scalar(f'test_accuracy_per_class/{name}', accuracy, epoch)
    writer.add_image('confusion_matrix', confusion_image(confusion, classes), epoch, dataformats='HWC')
    for name, parameter in model.named_parameters():
        writer.add_histogram(f'weights/{name}', parameter.detach().float().cpu(), epoch)
        if parameter.grad is not None:
            writer.add_histogram(f'gradients/{name}', parameter.grad.detach().float().cpu(), epoch)


def log_run_end(writer, epoch: int, test, classes, hparams: dict, best: dict) -> None:
    """At the end: a precision-recall curve per class, and the settings with the final and best metrics
    for the HPARAMS tab."""
    for c, name in enumerate(classes):
        writer.add_pr_curve(f'pr_curve/{name}', test.targets == c, test.probabilities[:, c], epoch)
    writer.add_hparams({k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))},
                       {'hparam/best_test_accuracy': best['accuracy'], 'hparam/best_epoch': best['epoch'],
                        'hparam/final_test_accuracy': test.accuracy, 'hparam/final_test_loss': test.loss},
                       run_name='.')
