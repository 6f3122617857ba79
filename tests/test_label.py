"""The sticker: a real QR decoder reads what the label carries, at the stock's size."""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image

from unitcert.code import ALPHABET, parse_code, qr_payload
from unitcert.device import Unit, init_unit
from unitcert.errors import CodeFormatError, InputError
from unitcert.label import Label, write_label
from unitcert.store import StateStore

MM_PER_POINT = 25.4 / 72
SETUP = "7K2M-Q3XD-9FZB-W4TN"
# Label printers leave the outer 1.5 mm of 62 mm tape unprinted; at 300 dpi
# that is 18 dots, where nothing may be drawn.
UNPRINTED = 18


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Unit:
    state = tmp_path_factory.mktemp("unit") / "state"
    return init_unit(StateStore(state), serial="7k2mq3xd9f", product="router").unit


def open_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        loaded = image.copy()
        loaded.info = dict(image.info)
        loaded.format = image.format
    return loaded


def is_valid_code(text: str) -> bool:
    try:
        parse_code(text)
    except CodeFormatError:
        return False
    return True


def decode_qr(image: Image.Image) -> list[str]:
    return [
        result.text
        for result in zxingcpp.read_barcodes(image)
        if result.format == zxingcpp.BarcodeFormat.QRCode
    ]


def render_pdf(pdf: Path) -> Image.Image:
    out = pdf.with_suffix("")
    subprocess.run(
        ["pdftoppm", "-r", "300", "-png", "-singlefile", str(pdf), str(out)],
        check=True,
        capture_output=True,
    )
    return open_image(out.with_suffix(".png"))


def pdf_text(pdf: Path) -> str:
    done = subprocess.run(
        ["pdftotext", "-layout", str(pdf), "-"],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def media_box_mm(pdf: Path) -> tuple[float, float]:
    boxes = re.findall(rb"/MediaBox\s*\[\s*([-\d.\s]+)\]", pdf.read_bytes())
    assert len(boxes) == 1
    x0, y0, x1, y1 = (float(n) for n in boxes[0].split())
    return (x1 - x0) * MM_PER_POINT, (y1 - y0) * MM_PER_POINT


def assert_edges_blank(image: Image.Image) -> None:
    gray = image.convert("L")
    width, height = gray.size
    bands = [
        (0, 0, width, UNPRINTED),
        (0, height - UNPRINTED, width, height),
        (0, 0, UNPRINTED, height),
        (width - UNPRINTED, 0, width, height),
    ]
    for band in bands:
        extrema = gray.crop(band).getextrema()
        assert isinstance(extrema[0], int)
        assert extrema[0] > 200, f"ink within 1.5 mm of the edge, in {band}"


def test_label_for_unit_carries_the_units_identity(unit: Unit) -> None:
    label = Label.for_unit(unit)

    assert label.product == "router"
    assert label.serial == "7k2mq3xd9f"
    assert label.hostname == "7k2mq3xd9f.router.home.arpa"
    assert label.code == str(unit.info.code)
    assert re.fullmatch(r"([0-9A-Z]{4}-){5}[0-9A-Z]", label.code)
    assert label.qr_payload == unit.qr_payload
    assert label.setup_credential is None
    assert Label.for_unit(unit, setup_credential=SETUP).setup_credential == SETUP


def test_png_label_is_62_by_29_mm_at_300_dpi_and_its_qr_reads_back(
    unit: Unit, tmp_path: Path
) -> None:
    label = Label.for_unit(unit)
    path = tmp_path / "label.png"

    write_label(label, path)

    image = open_image(path)
    assert image.format == "PNG"
    assert image.size == (732, 343)
    assert image.info["dpi"] == pytest.approx((300, 300), abs=0.01)
    assert decode_qr(image) == [unit.qr_payload]
    assert_edges_blank(image)
    assert path.stat().st_mode & 0o777 == 0o644


def test_pdf_label_page_is_62_by_29_mm_with_real_text_and_a_qr_that_reads_back(
    unit: Unit, tmp_path: Path
) -> None:
    label = Label.for_unit(unit)
    path = tmp_path / "label.pdf"

    write_label(label, path)

    assert path.read_bytes().startswith(b"%PDF-")
    assert media_box_mm(path) == pytest.approx((62.0, 29.0), abs=0.005)
    image = render_pdf(path)
    assert decode_qr(image) == [unit.qr_payload]
    assert_edges_blank(image)
    text = pdf_text(path)
    for field in ("router", "S/N 7k2mq3xd9f", "7k2mq3xd9f.router.home.arpa"):
        assert field in text
    # The code is printed in rows of two groups, so rows join without a hyphen.
    assert label.code.replace("-", "") in re.sub(r"[\s-]+", "", text)
    assert "Setup" not in text
    assert path.stat().st_mode & 0o777 == 0o644


def test_label_with_setup_credential_prints_it_and_is_readable_by_owner_only(
    unit: Unit, tmp_path: Path
) -> None:
    label = Label.for_unit(unit, setup_credential=SETUP)
    png = tmp_path / "label.png"
    pdf = tmp_path / "label.pdf"

    write_label(label, png)
    write_label(label, pdf)

    assert f"Setup: {SETUP}" in pdf_text(pdf)
    assert decode_qr(open_image(png)) == [unit.qr_payload]
    assert png.stat().st_mode & 0o777 == 0o600
    assert pdf.stat().st_mode & 0o777 == 0o600


def test_label_with_longest_names_still_fits_and_reads_back(
    unit: Unit, tmp_path: Path
) -> None:
    serial = "s" * 63
    hostname = f"{serial}.{'p' * 63}.living-room.customer-network.example.com"
    label = replace(
        Label.for_unit(unit, setup_credential=SETUP),
        product="p" * 63,
        serial=serial,
        hostname=hostname,
        qr_payload=qr_payload(hostname=hostname, serial=serial, spki_der=unit.spki_der),
    )
    png = tmp_path / "label.png"
    pdf = tmp_path / "label.pdf"

    write_label(label, png)
    write_label(label, pdf)

    for image in (open_image(png), render_pdf(pdf)):
        assert decode_qr(image) == [label.qr_payload]
        assert_edges_blank(image)
    assert hostname in re.sub(r"\s+", "", pdf_text(pdf))


def test_label_code_with_descending_letters_stays_off_the_edges(
    unit: Unit, tmp_path: Path
) -> None:
    # Vera's J and Q reach below the baseline; put them in the bottom row.
    candidates = ("-".join(["QJQJ"] * 5 + [check]) for check in ALPHABET)
    code = next(text for text in candidates if is_valid_code(text))
    label = replace(Label.for_unit(unit), code=code)
    png = tmp_path / "label.png"
    pdf = tmp_path / "label.pdf"

    write_label(label, png)
    write_label(label, pdf)

    assert_edges_blank(open_image(png))
    assert_edges_blank(render_pdf(pdf))


def test_write_label_takes_the_suffix_in_any_case(unit: Unit, tmp_path: Path) -> None:
    path = tmp_path / "LABEL.PNG"

    write_label(Label.for_unit(unit), path)

    assert open_image(path).size == (732, 343)


def test_write_label_rejects_other_suffixes_and_writes_nothing(
    unit: Unit, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match=r"\.png .* \.pdf"):
        write_label(Label.for_unit(unit), tmp_path / "label.jpg")

    assert list(tmp_path.iterdir()) == []


def test_write_label_reports_a_directory_that_does_not_exist(
    unit: Unit, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="cannot write the label"):
        write_label(Label.for_unit(unit), tmp_path / "missing" / "label.png")


def test_label_refuses_a_code_not_in_its_printed_form(unit: Unit) -> None:
    label = Label.for_unit(unit)

    with pytest.raises(ValueError, match="printed form"):
        replace(label, code=label.code.lower())
    with pytest.raises(ValueError, match="not a fingerprint code"):
        replace(label, code="B9X7-HK54")
    with pytest.raises(ValueError, match="hostname"):
        replace(label, hostname="two\nlines")
