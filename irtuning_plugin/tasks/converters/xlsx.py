"""Read the first sheet of an ``.xlsx`` workbook as rows of strings, with the standard library only.

Enough for a data sheet (shared, inline and formula-cached strings, numbers, booleans; empty cells
as ""), so reading ArgRevision's spreadsheet needs neither pandas nor openpyxl.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path
from xml.etree import ElementTree

NS = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main",
      "r": "http://schemas.openxmlformats.org/officeDocument/2006/relationships",
      "rel": "http://schemas.openxmlformats.org/package/2006/relationships"}
_REF = re.compile(r"([A-Z]+)(\d+)")


class XlsxError(ValueError):
    pass


def _column_index(letters: str) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + ord(ch) - 64
    return n - 1


def _text(node) -> str:
    return "".join(t.text or "" for t in node.iter(f"{{{NS['m']}}}t"))


def _part(zf: zipfile.ZipFile, file: str, member: str, what: str):
    """The parsed XML of one workbook member; missing, damaged or not XML: an XlsxError naming ``what``."""
    try:
        data = zf.read(member)
    except KeyError:
        raise XlsxError(f"{file}: {what} ({member}) is missing from the workbook; re-save it in Excel or "
                        f"LibreOffice, or give a .csv of the sheet") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise XlsxError(f"{file}: {what} ({member}) is damaged in the archive ({err}); re-save the workbook, or "
                        f"give a .csv of the sheet") from None
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as err:
        line, column = err.position
        raise XlsxError(f"{file}: {what} ({member}) is not valid XML (line {line}, column {column}); re-save the "
                        f"workbook, or give a .csv of the sheet") from None


def _first_sheet(zf: zipfile.ZipFile, file: str) -> tuple[str, str]:
    """(name, zip member) of the workbook's first sheet."""
    wb = _part(zf, file, "xl/workbook.xml", "the workbook part")
    sheet = wb.find("m:sheets/m:sheet", NS)
    if sheet is None:
        raise XlsxError(f"{file}: the workbook has no sheet")
    name, rid = sheet.get("name", "?"), sheet.get(f"{{{NS['r']}}}id")
    rels = _part(zf, file, "xl/_rels/workbook.xml.rels", "the workbook's relations part")
    for rel in rels.findall("rel:Relationship", NS):
        if rel.get("Id") == rid and rel.get("Target"):
            target = rel.get("Target").lstrip("/")
            return name, target if target.startswith("xl/") else f"xl/{target}"
    raise XlsxError(f"{file}: sheet {name!r}: its relation {rid} is not in xl/_rels/workbook.xml.rels")


def read_first_sheet(path: str | Path) -> list[list[str]]:
    """Rows of the first sheet (row 1 first), each a list of cell strings padded to the widest row."""
    file = Path(path).name
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise XlsxError(f"{file} is not an .xlsx workbook (not a zip archive)") from None
    with zf:
        shared = []
        if "xl/sharedStrings.xml" in zf.namelist():
            sst = _part(zf, file, "xl/sharedStrings.xml", "the shared strings part")
            shared = [_text(si) for si in sst.findall("m:si", NS)]
        name, member = _first_sheet(zf, file)
        sheet = _part(zf, file, member, f"sheet {name!r}")
    where = f"{file}: sheet {name!r} ({member})"
    rows: dict[int, dict[int, str]] = {}
    for row in sheet.iter(f"{{{NS['m']}}}row"):
        try:
            r = int(row.get("r")) if row.get("r") else len(rows) + 1
        except ValueError:
            raise XlsxError(f"{where}: row number {row.get('r')!r} is not a number") from None
        cells: dict[int, str] = {}
        for k, c in enumerate(row.findall("m:c", NS)):
            m = _REF.fullmatch(c.get("r", ""))
            col = _column_index(m.group(1)) if m else k
            kind, v = c.get("t", "n"), c.find("m:v", NS)
            if kind == "s":
                try:
                    value = shared[int(v.text)] if v is not None else ""
                except (TypeError, ValueError, IndexError):
                    raise XlsxError(f"{where} row {r}: cell {c.get('r', k + 1)} refers to shared string "
                                    f"{None if v is None else v.text!r}, which the workbook does not have") from None
            elif kind == "inlineStr":
                node = c.find("m:is", NS)
                value = _text(node) if node is not None else ""
            elif kind == "b":
                value = "TRUE" if v is not None and v.text == "1" else "FALSE"
            else:
                value = (v.text or "") if v is not None else ""
            cells[col] = value
        rows[r] = cells
    if not rows:
        return []
    width = max((max(c) + 1 for c in rows.values() if c), default=0)
    return [[rows.get(r, {}).get(i, "") for i in range(width)] for r in range(1, max(rows) + 1)]


def write_simple_xlsx(path: str | Path, rows: list[list[str]]) -> None:
    """A minimal valid workbook of inline strings (for tests and fixtures; Excel and pandas read it)."""
    from xml.sax.saxutils import escape

    def col(i: int) -> str:
        s = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            s = chr(65 + r) + s
        return s

    body = "".join(
        f'<row r="{r}">' + "".join(
            f'<c r="{col(i)}{r}" t="inlineStr"><is><t xml:space="preserve">{escape(v)}</t></is></c>'
            for i, v in enumerate(row) if v != "") + "</row>"
        for r, row in enumerate(rows, start=1))
    files = {
        "[Content_Types].xml": '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/'
        'package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
        'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/xl/'
        'workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.'
        'spreadsheetml.worksheet+xml"/></Types>',
        "_rels/.rels": '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/'
        'package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/'
        '2006/relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="{NS["m"]}" xmlns:r="{NS["r"]}">'
        '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{NS["rel"]}">'
        '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet"'
        ' Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="{NS["m"]}">'
        f'<sheetData>{body}</sheetData></worksheet>',
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
