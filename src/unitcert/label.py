"""The unit's sticker: product, serial, host name, fingerprint code and QR code.

The label is sized for 62 mm x 29 mm stock (a continuous 62 mm roll such as
Brother DK-22205, cut to 29 mm). One layout is computed in printer dots at
300 dpi and drawn twice: by Pillow into a PNG of exactly 732 x 343 dots, and by
reportlab into a vector PDF whose page is exactly 62 x 29 mm. Both use
Bitstream Vera, which reportlab ships, so a label needs no system font and the
two files look the same.

Layout, left to right: the QR code with its quiet zone, then a text column
with the product, serial and host name at the top and the fingerprint code at
the bottom, large and in a fixed grid (every symbol in a cell of the same
width) so that a person can copy it symbol by symbol when no phone reads the
QR. When the factory prints the setup credential, it goes below the code.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from unitcert.code import parse_code
from unitcert.errors import CodeFormatError, InputError
from unitcert.store import write_output_file

if TYPE_CHECKING:
    from PIL import ImageFont

    from unitcert.device import Unit

__all__ = [
    "LABEL_DPI",
    "LABEL_HEIGHT_MM",
    "LABEL_WIDTH_MM",
    "Label",
    "write_label",
]

logger = logging.getLogger(__name__)

LABEL_WIDTH_MM = 62.0
LABEL_HEIGHT_MM = 29.0
LABEL_DPI = 300

_MM_PER_INCH = 25.4
_POINTS_PER_INCH = 72
_WIDTH = round(LABEL_WIDTH_MM / _MM_PER_INCH * LABEL_DPI)  # 732 dots
_HEIGHT = round(LABEL_HEIGHT_MM / _MM_PER_INCH * LABEL_DPI)  # 343 dots
# Label printers leave about 1.5 mm unprinted at each edge of 62 mm tape; text
# keeps 2 mm (24 dots) from every edge.
_EDGE = 24
# ISO/IEC 18004 asks for a light margin of 4 modules around the symbol.
_QUIET_MODULES = 4
# Error correction Q survives a scratched or partly peeled sticker; a payload
# so long that Q would need modules under 0.42 mm falls back to M.
_MIN_Q_MODULE = 5
# Below 0.25 mm per module a 300 dpi print is no longer reliably scannable.
_MIN_MODULE = 3

_FONT_FILES = {"regular": "Vera.ttf", "bold": "VeraBd.ttf"}
_PDF_FONT_NAMES = {"regular": "UnitcertVera", "bold": "UnitcertVera-Bold"}
# Ink extent of Vera's ASCII glyphs, as fractions of the font size: the top of
# ascenders (b, d, k), the top of capitals and digits, the bottom of
# descenders (g, p, y), and the bottom of the capitals that descend (Vera's J
# hooks below the baseline, Q's tail too).
_ASCENT = 0.76
_CAP_HEIGHT = 0.745
_DESCENT = 0.24
_CAP_DESCENT = 0.2
# White space between the ink of two lines: text lines, and rows of the code.
_LINE_GAP = 0.22
_ROW_GAP = 0.12
# The code's grid: a symbol cell is 0.86 em, wide enough for every symbol of
# the code's alphabet except M and W, which overhang their cells by a hair; a
# hyphen cell is 0.5 em.
_CELL_EM = 0.86
_HYPHEN_EM = 0.5
_CODE_GROUPS_PER_ROW = 2

# Largest sizes, in dots, before the layout shrinks to fit.
_PRODUCT_SIZE = 36
_DETAIL_SIZE = 25
_CODE_SIZE = 48
_SETUP_SIZE = 24
# A line shrinks to this fraction of its size before it wraps instead.
_MIN_SHRINK = 0.75
# The layout tries these scales of the sizes above, largest first; the code
# keeps its full size until the rest is at 70 %.
_SCALES = tuple(s / 20 for s in range(20, 7, -1))
_CODE_SCALE_FLOOR = 0.7
# Pillow and reportlab round glyph advances slightly differently.
_WIDTH_SLACK = 2


@dataclass(frozen=True)
class Label:
    """What a unit's sticker shows.

    Attributes:
        product: the product name.
        serial: the unit's serial.
        hostname: the unit's host name.
        code: the fingerprint code as printed, like
            ``B9X7-HK54-M3T2-1PDW-CAXP-X``.
        qr_payload: the text the QR code carries (DESIGN.md, "QR payload").
        setup_credential: the one-time setup credential, printed only when
            the factory sets it.

    Raises:
        ValueError: a field is empty or holds a line break, or the code is not
            a fingerprint code in its printed form.
    """

    product: str
    serial: str
    hostname: str
    code: str
    qr_payload: str
    setup_credential: str | None = None

    def __post_init__(self) -> None:
        fields = {
            "product": self.product,
            "serial": self.serial,
            "hostname": self.hostname,
            "code": self.code,
            "qr_payload": self.qr_payload,
        }
        if self.setup_credential is not None:
            fields["setup_credential"] = self.setup_credential
        for name, value in fields.items():
            if not value.strip() or not value.isprintable():
                raise ValueError(f"the label's {name} must be one non-empty line")
        try:
            printed = str(parse_code(self.code))
        except CodeFormatError as exc:
            raise ValueError(
                f"the label's code is not a fingerprint code: {exc}"
            ) from exc
        if printed != self.code:
            raise ValueError(f"the label's code must be in its printed form, {printed}")

    @classmethod
    def for_unit(cls, unit: Unit, *, setup_credential: str | None = None) -> Label:
        """Return the label of a unit's identity, as loaded from its state.

        Args:
            unit: the unit.
            setup_credential: the setup credential to print, when the factory
                prints it; None leaves it off the label.
        """
        return cls(
            product=unit.meta.product,
            serial=unit.meta.serial,
            hostname=unit.meta.hostname,
            code=str(unit.info.code),
            qr_payload=unit.qr_payload,
            setup_credential=setup_credential,
        )


def write_label(label: Label, path: Path) -> None:
    """Write the label as a PNG (300 dpi) or a vector PDF, chosen by suffix.

    The file is replaced atomically. It is readable by everyone, unless it
    carries a setup credential: then only its owner may read it.

    Args:
        label: what to print.
        path: the file to write, ending in ``.png`` or ``.pdf`` (any case).

    Raises:
        InputError: the suffix is neither, the label's text cannot fit on the
            label, or the file cannot be written.
    """
    kind = path.suffix.lower()
    if kind not in (".png", ".pdf"):
        raise InputError(
            f"cannot write a label to {path}: name the file with .png for an "
            "image or .pdf for a printable vector file"
        )

    sheet = _layout(label)
    data = _render_png(sheet) if kind == ".png" else _render_pdf(sheet, label)

    mode = 0o600 if label.setup_credential is not None else 0o644
    try:
        write_output_file(path, data, mode=mode)
    except OSError as exc:
        raise InputError(
            f"cannot write the label to {path} ({exc.strerror}): choose a file in "
            "a directory that exists and is writable"
        ) from exc
    logger.info("wrote the label for %s to %s", label.hostname, path)


# --- layout, in dots at 300 dpi, y growing downwards ------------------------


@dataclass(frozen=True)
class _Line:
    """One line of text: its left edge, baseline, font and size (dots).

    ``grid`` lines put every character in a fixed-width cell.
    """

    text: str
    font: str
    size: int
    x: int
    baseline: int
    grid: bool = False


@dataclass(frozen=True)
class _Sheet:
    """A laid-out label: the QR matrix and where its modules go, and the text."""

    qr: tuple[tuple[bool, ...], ...]
    qr_x: int
    qr_y: int
    module: int
    lines: tuple[_Line, ...]


@dataclass(frozen=True)
class _Block:
    """Lines of one size and font, before they are placed."""

    texts: tuple[str, ...]
    font: str
    size: int
    grid: bool = False

    @property
    def top(self) -> float:
        """From the top of the ink to the baseline."""
        return self.size * (_CAP_HEIGHT if self.grid else _ASCENT)

    @property
    def bottom(self) -> float:
        """From the baseline to the bottom of the ink."""
        return self.size * (_CAP_DESCENT if self.grid else _DESCENT)

    @property
    def pitch(self) -> float:
        """From one baseline to the next."""
        return (
            self.top + self.bottom + self.size * (_ROW_GAP if self.grid else _LINE_GAP)
        )

    @property
    def height(self) -> float:
        """From the top of the first line's ink to the bottom of the last's."""
        return self.pitch * (len(self.texts) - 1) + self.top + self.bottom


@functools.cache
def _font_path(font: str) -> str:
    import reportlab

    return str(Path(reportlab.__file__).parent / "fonts" / _FONT_FILES[font])


@functools.cache
def _pdf_font(font: str) -> str:
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    name = _PDF_FONT_NAMES[font]
    if name not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont(name, _font_path(font)))
    return name


def _text_width(text: str, font: str, size: float) -> float:
    from reportlab.pdfbase import pdfmetrics

    return float(pdfmetrics.stringWidth(text, _pdf_font(font), size))


def _cell_width(char: str, size: float) -> float:
    return size * (_HYPHEN_EM if char == "-" else _CELL_EM)


def _grid_width(text: str, size: float) -> float:
    return sum(_cell_width(char, size) for char in text)


def _qr_matrix(payload: str) -> tuple[tuple[tuple[bool, ...], ...], int]:
    """Encode the payload; return the matrix (no quiet zone) and the module size."""
    import qrcode
    from qrcode.constants import ERROR_CORRECT_M, ERROR_CORRECT_Q

    best: tuple[tuple[tuple[bool, ...], ...], int] | None = None
    for level in (ERROR_CORRECT_Q, ERROR_CORRECT_M):
        symbol = qrcode.QRCode(error_correction=level, border=0)
        symbol.add_data(payload)
        symbol.make(fit=True)
        matrix = tuple(tuple(bool(cell) for cell in row) for row in symbol.get_matrix())
        module = _module_size(len(matrix))
        if best is None or module > best[1]:
            best = (matrix, module)
        if module >= _MIN_Q_MODULE:
            break
    assert best is not None
    if best[1] < _MIN_MODULE:
        raise InputError(
            "the label's QR code would be too dense to scan at 62 x 29 mm: use a "
            "shorter product name, serial or domain"
        )
    return best


def _module_size(count: int) -> int:
    """The largest module (dots) whose symbol and quiet zone fit the label height."""
    module = _HEIGHT // count
    while module > 0 and count * module + 2 * _quiet(module) > _HEIGHT:
        module -= 1
    return module


def _quiet(module: int) -> int:
    return max(_QUIET_MODULES * module, _EDGE)


def _layout(label: Label) -> _Sheet:
    """Place the QR code and fit the text column, shrinking until it fits.

    Raises:
        InputError: even the smallest legible sizes do not fit.
    """
    matrix, module = _qr_matrix(label.qr_payload)
    side = len(matrix) * module
    qr_x = _quiet(module)
    qr_y = (_HEIGHT - side) // 2
    left = qr_x + side + _quiet(module)
    width = _WIDTH - _EDGE - left - _WIDTH_SLACK

    for scale in _SCALES:
        lines = _place_column(label, left, width, scale)
        if lines is not None:
            return _Sheet(matrix, qr_x, qr_y, module, lines)
    raise InputError(
        f"the label's text for {label.hostname} does not fit on a 62 x 29 mm "
        "label: use a shorter product name, serial or domain"
    )


def _place_column(
    label: Label, left: int, width: int, scale: float
) -> tuple[_Line, ...] | None:
    """Lay the text column out at ``scale``; None when it is too tall."""
    top_blocks = [
        _fit(label.product, "bold", _PRODUCT_SIZE * scale, width),
        _fit(f"S/N {label.serial}", "regular", _DETAIL_SIZE * scale, width),
        _fit(label.hostname, "regular", _DETAIL_SIZE * scale, width),
    ]
    bottom_blocks = [_code_block(label.code, width, scale)]
    if label.setup_credential is not None:
        bottom_blocks.append(
            _fit(
                f"Setup: {label.setup_credential}",
                "regular",
                _SETUP_SIZE * scale,
                width,
            )
        )

    gap = round(_DETAIL_SIZE * scale * 0.45)
    block_gap = round(_DETAIL_SIZE * scale * 0.8)
    top_height = _stack_height(top_blocks, gap)
    bottom_height = _stack_height(bottom_blocks, gap)
    if top_height + block_gap + bottom_height > _HEIGHT - 2 * _EDGE:
        return None

    lines = _stack(top_blocks, left, _EDGE, gap)
    lines += _stack(bottom_blocks, left, _HEIGHT - _EDGE - round(bottom_height), gap)
    return tuple(lines)


def _code_block(code: str, width: int, scale: float) -> _Block:
    groups = code.split("-")
    rows = tuple(
        "-".join(groups[i : i + _CODE_GROUPS_PER_ROW])
        for i in range(0, len(groups), _CODE_GROUPS_PER_ROW)
    )
    widest = max(_grid_width(row, 1.0) for row in rows)
    code_scale = min(1.0, scale / _CODE_SCALE_FLOOR)
    size = min(_CODE_SIZE * code_scale, width / widest)
    return _Block(rows, "bold", math.floor(size), grid=True)


def _fit(text: str, font: str, size: float, width: int) -> _Block:
    """Fit ``text`` to ``width``: shrink it a little, else wrap it."""
    natural = _text_width(text, font, size)
    if natural <= width:
        return _Block((text,), font, math.floor(size))
    shrunk = math.floor(size * width / natural)
    if shrunk >= size * _MIN_SHRINK:
        return _Block((text,), font, shrunk)
    small = math.floor(size * _MIN_SHRINK)
    return _Block(tuple(_wrap(text, font, small, width)), font, small)


def _wrap(text: str, font: str, size: int, width: int) -> list[str]:
    """Break ``text`` into lines no wider than ``width``.

    Lines break after a dot or a hyphen where possible (host names), else
    between any two characters.
    """
    pieces: list[str] = []
    start = 0
    for index, char in enumerate(text):
        if char in ".- ":
            pieces.append(text[start : index + 1])
            start = index + 1
    if start < len(text):
        pieces.append(text[start:])

    lines: list[str] = []
    current = ""
    for piece in pieces:
        if _text_width(current + piece, font, size) <= width:
            current += piece
            continue
        if current and _text_width(piece, font, size) <= width:
            lines.append(current.rstrip())
            current = piece
            continue
        for char in piece:
            if current and _text_width(current + char, font, size) > width:
                lines.append(current)
                current = ""
            current += char
    if current:
        lines.append(current.rstrip())
    return lines


def _stack_height(blocks: list[_Block], gap: int) -> float:
    return sum(block.height for block in blocks) + gap * (len(blocks) - 1)


def _stack(blocks: list[_Block], left: int, top: int, gap: int) -> list[_Line]:
    """Place blocks one under the other, the first one's ink starting at ``top``."""
    lines: list[_Line] = []
    y = float(top)
    for block in blocks:
        baseline = y + block.top
        for text in block.texts:
            lines.append(
                _Line(text, block.font, block.size, left, round(baseline), block.grid)
            )
            baseline += block.pitch
        y += block.height + gap
    return lines


# --- rendering ---------------------------------------------------------------


@functools.cache
def _pil_font(font: str, size: int) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    return ImageFont.truetype(_font_path(font), size)


def _render_png(sheet: _Sheet) -> bytes:
    """Draw the sheet as a grayscale PNG of 732 x 343 dots, tagged 300 dpi."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (_WIDTH, _HEIGHT), 255)
    draw = ImageDraw.Draw(image)
    m = sheet.module
    for row, cells in enumerate(sheet.qr):
        for col, dark in enumerate(cells):
            if dark:
                x = sheet.qr_x + col * m
                y = sheet.qr_y + row * m
                draw.rectangle((x, y, x + m - 1, y + m - 1), fill=0)

    for line in sheet.lines:
        font = _pil_font(line.font, line.size)
        if not line.grid:
            draw.text(
                (line.x, line.baseline), line.text, font=font, fill=0, anchor="ls"
            )
            continue
        left = float(line.x)
        for char in line.text:
            cell = _cell_width(char, line.size)
            draw.text(
                (left + cell / 2, line.baseline), char, font=font, fill=0, anchor="ms"
            )
            left += cell

    out = io.BytesIO()
    image.save(out, format="PNG", dpi=(LABEL_DPI, LABEL_DPI), optimize=True)
    return out.getvalue()


def _render_pdf(sheet: _Sheet, label: Label) -> bytes:
    """Draw the sheet as a one-page vector PDF of exactly 62 x 29 mm."""
    from reportlab.pdfgen.canvas import Canvas

    scale = _POINTS_PER_INCH / LABEL_DPI
    page_height = LABEL_HEIGHT_MM / _MM_PER_INCH * _POINTS_PER_INCH
    page_width = LABEL_WIDTH_MM / _MM_PER_INCH * _POINTS_PER_INCH

    out = io.BytesIO()
    canvas = Canvas(out, pagesize=(page_width, page_height), invariant=True)
    canvas.setTitle(f"Label for {label.hostname}")
    canvas.setSubject(f"{label.product} {label.serial}, code {label.code}")
    canvas.setCreator("unitcert")
    canvas.setFillColorRGB(0, 0, 0)

    # One path for the whole symbol, one rectangle per run of dark modules in
    # a row, so that viewers draw no hairlines between neighbouring modules.
    path = canvas.beginPath()
    m = sheet.module
    for row, cells in enumerate(sheet.qr):
        col = 0
        while col < len(cells):
            if not cells[col]:
                col += 1
                continue
            run = col
            while run < len(cells) and cells[run]:
                run += 1
            x = sheet.qr_x + col * m
            y = sheet.qr_y + (row + 1) * m
            path.rect(
                x * scale, page_height - y * scale, (run - col) * m * scale, m * scale
            )
            col = run
    canvas.drawPath(path, stroke=0, fill=1)

    for line in sheet.lines:
        canvas.setFont(_pdf_font(line.font), line.size * scale)
        baseline = page_height - line.baseline * scale
        if not line.grid:
            canvas.drawString(line.x * scale, baseline, line.text)
            continue
        left = float(line.x)
        for char in line.text:
            cell = _cell_width(char, line.size)
            canvas.drawCentredString((left + cell / 2) * scale, baseline, char)
            left += cell

    canvas.showPage()
    canvas.save()
    return out.getvalue()
