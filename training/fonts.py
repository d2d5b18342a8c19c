"""Text in the pictures the project draws (TensorBoard's sample grid and confusion matrix, ``test.py
--explain``), so that class names in Chinese (``猫/``, ``狗/``) come out legible, and never crash a run.

Pillow's own font draws Latin letters only: before Pillow 10.1 it is a bitmap font that raises
UnicodeEncodeError ('latin-1' codec) on a Chinese character; from 10.1 on, a vector font that draws a box for
it. So a font that has Chinese is looked for where each system keeps one (Windows, macOS and most Linux
desktops have one, see platforms.CJK_FONTS); where there is none, a name it cannot draw is shown by its index
and the ASCII letters it has.
"""
import functools
import os
import unicodedata

from PIL import ImageFont

from .platforms import cjk_font_candidates


@functools.lru_cache(maxsize=1)
def cjk_font_path():
    """The first font on this system that draws Chinese, or None."""
    for path in cjk_font_candidates():
        if os.path.isfile(path):
            try:
                ImageFont.truetype(path, 12)
                return path
            except OSError:  # not a font FreeType reads, or Pillow without FreeType
                continue
    return None


@functools.lru_cache(maxsize=None)
def font(size: int):
    """A font of about ``size`` pixels: one that draws Chinese where the system has one, else Pillow's own."""
    path = cjk_font_path()
    if path:
        return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def can_draw(text: str) -> bool:
    """Whether ``font()`` draws every character of ``text`` (Pillow's own fonts: Latin-1 only)."""
    return cjk_font_path() is not None or all(ord(c) < 256 for c in text)


def ascii_safe(text: str) -> str:
    """``text`` in ASCII: accents dropped ('Café' -> 'Cafe'), other characters as '?'."""
    plain = unicodedata.normalize('NFKD', text)
    return ''.join(c if ord(c) < 128 else '?' for c in plain if not unicodedata.combining(c))


def drawable(text: str) -> str:
    """``text`` where it can be drawn, else its ASCII-safe form."""
    return text if can_draw(text) else ascii_safe(text)


def class_label(name: str, index: int) -> str:
    """A class name to draw: itself where it can be drawn, else its index and the ASCII it has ('3', '3 b')."""
    if can_draw(name):
        return name
    letters = ''.join(c for c in ascii_safe(name) if c != '?').strip()
    return f'{index} {letters}' if letters else str(index)
