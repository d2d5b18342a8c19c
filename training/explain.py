"""``test.py --explain DIR``: one picture per image of what the model saw and why it answered as it did.

    [ the picture ] [ the 32x32 image the model receives, enlarged ] [ Grad-CAM heat map ] [ top-k bars ]

Grad-CAM (Selvaraju et al., 2017): the gradient of the class's score with respect to the last convolution
stage's output (64 maps of 8x8 for MyModel) says how much each map matters for that class; the maps, weighed
so and summed, then clipped at 0, show where in the image the evidence for the class lies. The 8x8 result is
stretched over the picture (which the model saw squeezed to 32x32) and drawn over it in colour.
"""
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import UserError
from .files import atomic_write
from .fonts import class_label, drawable, font

PANEL = 256  # each picture panel is PANEL x PANEL pixels
BARS_WIDTH = 300
TITLE = 28   # the line of text above each panel
MARGIN = 12


def last_conv(model) -> torch.nn.Module:
    """MyModel's last convolution layer (its output: the last convolution stage)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]


def grad_cam(model, image: torch.Tensor, target: int = None, normalize=None) -> tuple:
    """(Grad-CAM map of ``target`` -- default: the predicted class -- as an HxW tensor in [0, 1] at the last
    convolution stage's resolution, the class it is for). ``image``: 3x32x32 in [0, 1]; ``normalize``: the
    module that normalises it as in training, if any."""
    saved = {}

    def keep(module, inputs, output):
        output.retain_grad()
        saved['maps'] = output

    handle = last_conv(model).register_forward_hook(keep)
    try:
        model.eval()
        with torch.enable_grad():
            x = image.unsqueeze(0).float()
            scores = model(normalize(x) if normalize is not None else x)
            target = int(scores.argmax(1)) if target is None else target
            model.zero_grad()
            scores[0, target].backward()
    finally:
        handle.remove()
    maps, grads = saved['maps'][0].detach(), saved['maps'].grad[0]
    weights = grads.mean(dim=(1, 2))  # one weight per map
    cam = torch.relu((weights[:, None, None] * maps).sum(0))
    return (cam / cam.max() if cam.max() > 0 else cam), target


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 on a blue - cyan - yellow - red scale."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float64)
    position = v * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    t = position - low
    return (stops[low[..., 0]] * (1 - t) + stops[low[..., 0] + 1] * t).round().astype(np.uint8)


def fit(picture: Image.Image, size: int = PANEL) -> Image.Image:
    """The picture scaled (up or down) to fit size x size, centred on white."""
    factor = size / max(picture.size)
    scaled = picture.resize((max(1, round(picture.width * factor)), max(1, round(picture.height * factor))),
                            Image.Resampling.LANCZOS)
    canvas = Image.new('RGB', (size, size), 'white')
    canvas.paste(scaled, ((size - scaled.width) // 2, (size - scaled.height) // 2))
    return canvas


def model_view(image: torch.Tensor, size: int = PANEL) -> Image.Image:
    """The 3x32x32 input enlarged with each pixel a visible square, thin lines between them."""
    pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    big = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
    draw, step = ImageDraw.Draw(big), size // image.shape[-1]
    for i in range(step, size, step):
        draw.line([(i, 0), (i, size - 1)], fill=(255, 255, 255), width=1)
        draw.line([(0, i), (size - 1, i)], fill=(255, 255, 255), width=1)
    return big


def overlay(picture: Image.Image, cam: torch.Tensor, size: int = PANEL) -> Image.Image:
    """The Grad-CAM map stretched over the picture (as the model saw it: the whole picture), in colour."""
    base = picture.convert('RGB').resize((size, size), Image.Resampling.BILINEAR)
    heat = Image.fromarray(cam.numpy().astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)  # mode F
    colours = Image.fromarray(heat_colours(np.asarray(heat)))
    return Image.blend(base, colours, 0.5)


def bars(top: list, width: int = BARS_WIDTH, height: int = PANEL) -> Image.Image:
    """Labelled horizontal bars, one per guess: [{'class', 'index', 'probability'}, ...], best first."""
    panel = Image.new('RGB', (width, height), 'white')
    draw, text = ImageDraw.Draw(panel), font(15)
    row = height // max(len(top), 1)
    label_width, bar_width = 100, width - 100 - 60
    for i, guess in enumerate(top):
        y = i * row + row // 2
        draw.text((0, y - 9), class_label(guess['class'], guess['index'])[:12], fill='black', font=text)
        length = round(guess['probability'] * bar_width)
        draw.rectangle([label_width, y - 8, label_width + bar_width, y + 8], outline=(200, 200, 200))
        if length:
            draw.rectangle([label_width, y - 8, label_width + length - 1, y + 8],
                           fill=(220, 80, 40) if i == 0 else (120, 120, 120))
        draw.text((label_width + bar_width + 6, y - 9), f'{guess["probability"]:.0%}', fill='black', font=text)
    return panel


def layout() -> dict:
    """Where each panel goes: name -> (left, top, right, bottom)."""
    x, boxes = MARGIN, {}
    for name, width in (('picture', PANEL), ('model_view', PANEL), ('grad_cam', PANEL), ('bars', BARS_WIDTH)):
        boxes[name] = (x, MARGIN + TITLE, x + width, MARGIN + TITLE + PANEL)
        x += width + MARGIN
    return boxes


def captions(picture: Image.Image, image: torch.Tensor, top: list) -> dict:
    """The line of text above each panel: panel name -> text."""
    return {'picture': f'your picture ({picture.width}x{picture.height})',
            'model_view': f'what the model gets: {image.shape[-1]}x{image.shape[-2]} pixels',
            'grad_cam': f'Grad-CAM: where "{class_label(top[0]["class"], top[0]["index"])}" was seen',
            'bars': f'top {len(top)} guesses'}


def explain_figure(picture: Image.Image, image: torch.Tensor, cam: torch.Tensor, top: list, title: str) -> Image.Image:
    """The whole figure for one image (see the module's docstring)."""
    boxes = layout()
    width = max(box[2] for box in boxes.values()) + MARGIN
    figure = Image.new('RGB', (width, MARGIN + TITLE + PANEL + MARGIN + 24), 'white')
    draw, text = ImageDraw.Draw(figure), font(15)
    panels = {'picture': fit(picture), 'model_view': model_view(image), 'grad_cam': overlay(picture, cam),
              'bars': bars(top)}
    lines = captions(picture, image, top)
    for name, panel in panels.items():
        left, top_edge = boxes[name][:2]
        figure.paste(panel, (left, top_edge))
        draw.text((left, MARGIN + 4), lines[name], fill='black', font=text)
    draw.text((MARGIN, MARGIN + TITLE + PANEL + 6), drawable(title), fill=(80, 80, 80), font=text)
    return figure


def write_explanations(model, normalize, pictures: list, images: torch.Tensor, predictions: list, folder) -> list:
    """One PNG per image into ``folder`` (made if missing), named after the image: the paths written.
    ``pictures``: (path, the picture as loaded, RGB); ``images``: what the model got, N x 3 x 32 x 32."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f'--explain: cannot make {folder}/ ({e.strerror or e}); choose another folder') from None
    written = []
    for (path, picture), image, prediction in zip(pictures, images, predictions):
        cam, _ = grad_cam(model, image.cpu(), normalize=normalize)
        figure = explain_figure(picture, image.cpu(), cam, prediction['top'], f'{path}')
        buffer = io.BytesIO()
        figure.save(buffer, format='PNG', optimize=True)
        target = folder / f'{Path(path).stem}.explain.png'
        try:
            atomic_write(buffer.getvalue(), target)
        except OSError as e:
            raise UserError(f'--explain: cannot write {target} ({e.strerror or e})') from None
        written.append(target)
    return written
