"""``python test.py --eval``: how good a checkpoint is on the test split, class by class."""
import unicodedata
from argparse import Namespace

import torch
from torch import nn

from .batches import make_batches
from .device import Autocast
from .data import CHINESE_NAMES, Data
from .errors import UserError
from .meters import TestMeter


def evaluation_settings(checkpoint: dict, precision: str = None) -> Namespace:
    """How --eval runs the test loop: as the training run that wrote ``checkpoint`` ran its own -- its
    precision (``precision`` overrides it), batch size and memory layout -- so that the two report the same
    accuracy on the same machine; a plain state_dict, of unknown origin: fp32, batches of 500."""
    config = checkpoint.get('config') or {}
    return Namespace(loader='auto', batch_size=config.get('batch_size', 500), seed=0, num_workers=0,
                     channels_last=config.get('channels_last', True), crop_padding=0, flip=False, quiet=True,
                     precision=precision or config.get('precision', 'fp32'), as_trained=bool(config) and not precision)


def evaluation_report(model, classes, data: Data, device, checkpoint: str, how: Namespace, mistakes: int = 5) -> dict:
    """Accuracy overall and per class, the confusion matrix and the most confident mistakes, as plain data;
    ``how``: see evaluation_settings (the checkpoint's normalisation and TTA are part of ``model``)."""
    if list(classes) != list(data.classes):
        raise UserError(f'{checkpoint} knows the classes {", ".join(classes[:4])} ..., the data set '
                        f'{", ".join(data.classes[:4])} ...: evaluate it on the data it was trained for (--data-dir)')
    _, test_batches = make_batches(data, how, device)
    if how.channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    autocast = Autocast(how.precision, device)  # as the training run's test loop ran
    meter, loss_fn = TestMeter(device, keep_outputs=True), nn.CrossEntropyLoss(reduction='sum')
    with torch.no_grad():
        for images, targets in test_batches:
            with autocast():
                outputs = model(images)
                loss = loss_fn(outputs, targets)
            meter.add(loss, outputs, targets)
    result = meter.result()
    confidence, predicted = result.probabilities.max(1)
    wrong = (predicted != result.targets).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)[:mistakes]].tolist()
    files = getattr(data.test, 'samples', None)
    per_class = result.confusion.diag().double() / result.confusion.sum(1).clamp(min=1)
    return {
        'checkpoint': checkpoint, 'data': data.source, 'images': result.images, 'precision': autocast.name,
        'batch_size': how.batch_size, 'as_trained': how.as_trained,
        'accuracy': result.accuracy, 'loss': result.loss, 'classes': list(classes),
        'per_class': [{'class': name, 'chinese': CHINESE_NAMES.get(name), 'accuracy': acc, 'images': int(n)}
                      for name, acc, n in zip(classes, per_class.tolist(), result.confusion.sum(1).tolist())],
        'confusion': result.confusion.tolist(),
        'mistakes': [{'index': i, 'file': files[i][0] if files else None,
                      'true': classes[result.targets[i]], 'predicted': classes[predicted[i]],
                      'probability': confidence[i].item()} for i in worst],
    }


def pad(text: str, width: int) -> str:
    """Left-align for a terminal, where a Chinese character takes two columns."""
    columns = sum(2 if unicodedata.east_asian_width(ch) in 'WF' else 1 for ch in text)
    return text + ' ' * max(width - columns, 0)


def format_report(report: dict) -> str:
    def name(english):
        return f'{english} {CHINESE_NAMES[english]}' if english in CHINESE_NAMES else english

    correct = round(report['accuracy'] * report['images'])
    lines = [f'checkpoint: {report["checkpoint"]}; test split of {report["data"]}',
             f'accuracy: {report["accuracy"]:.2%} ({correct}/{report["images"]}), mean loss {report["loss"]:.4f} '
             f'({report["precision"]}, batches of {report["batch_size"]}'
             f'{", as its training run evaluated" if report["as_trained"] else ""})',
             '', f'{"class":<16} {"accuracy":>8} {"images":>7}']
    lines += [f'{pad(name(row["class"]), 16)} {row["accuracy"]:8.1%} {row["images"]:7d}' for row in report['per_class']]
    short = [c[:5] for c in report['classes']]
    lines += ['', 'confusion matrix (rows: true class, columns: predicted)',
              ' ' * 12 + ''.join(f'{c:>6}' for c in short)]
    lines += [f'{c[:11]:<12}' + ''.join(f'{n:6d}' for n in row)
              for c, row in zip(report['classes'], report['confusion'])]
    lines += ['', 'most confident mistakes:']
    for m in report['mistakes']:
        where = m['file'] or f'test image #{m["index"]}'
        lines.append(f'  {where}: is {name(m["true"])}, predicted {name(m["predicted"])} ({m["probability"]:.1%})')
    return '\n'.join(lines)
