"""Personal data in text: e-mail addresses, phone numbers (international, North American, Chinese mobile),
Chinese resident ID numbers (GB 11643 checksum), bank cards (Luhn) and IP addresses.

Patterns find candidates; checksums and value checks (a real birth date, octets <= 255) keep the precision.
Kinds are matched in a fixed order and a later kind never overlaps an earlier match (an ID number is not also
a phone number). Matches are bounded by ASCII lookarounds, not \\b or \\w: Chinese characters count as word characters.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "cn_id": "<CN_ID>",
    "bank_card": "<BANK_CARD>",
    "ip": "<IP>",
    "phone": "<PHONE>",
}

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
_CN_ID = re.compile(r"(?<![\dA-Za-z])\d{17}[\dXx](?![\dA-Za-z])")
_BANK_CARD = re.compile(r"(?<![\d+-])(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?)(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]|\.\d)")
_IPV6 = re.compile(r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])")
_PHONE = re.compile(
    r"(?<![0-9A-Za-z+])\+\d{1,3}[ -]?(?:\(\d{1,4}\)[ -]?)?\d{1,4}(?:[ -]?\d{2,4}){1,4}(?!\d)"  # +CC ...
    r"|(?<!\d)1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)"  # Chinese mobile: 1[3-9]x xxxx xxxx
    r"|(?<![\d(])(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?!\d)"  # North American: (415) 555-0132
)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int
    text: str


def cn_id_check_char(first17: str) -> str:
    """GB 11643-1999 check character of the first 17 digits of a resident ID number."""
    return "10X98765432"[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS)) % 11]


def is_cn_id(number: str) -> bool:
    """An 18-character resident ID: a valid birth date (1900 on, not in the future) and its check character."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    try:
        born = datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    if not datetime.date(1900, 1, 1) <= born <= datetime.date.today():
        return False
    return cn_id_check_char(number[:17]) == number[17].upper()


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _phone_ok(text: str) -> bool:
    return 7 <= sum(c.isdigit() for c in text) <= 15


_CHECKS = (
    ("email", _EMAIL, lambda t: True),
    ("cn_id", _CN_ID, is_cn_id),
    ("bank_card", _BANK_CARD, lambda t: luhn_ok(re.sub(r"\D", "", t)) and len(set(re.sub(r"\D", "", t))) > 1),
    ("ip", _IPV4, _is_ip),
    ("ip", _IPV6, lambda t: t.count(":") >= 2 and _is_ip(t)),
    ("phone", _PHONE, _phone_ok),
)


def find_pii(text: str) -> list[Finding]:
    """Every personal-data match in `text`, in order of position."""
    found: list[Finding] = []
    for kind, pattern, valid in _CHECKS:
        for m in pattern.finditer(text):
            if any(m.start() < f.end and f.start < m.end() for f in found) or not valid(m.group()):
                continue
            found.append(Finding(kind, m.start(), m.end(), m.group()))
    return sorted(found, key=lambda f: f.start)


def scrub(text: str, findings: list[Finding] | None = None) -> str:
    """`text` with each finding replaced by its typed placeholder (<PHONE>), the rest unchanged."""
    out, pos = [], 0
    for f in find_pii(text) if findings is None else findings:
        out += [text[pos : f.start], PLACEHOLDERS[f.kind]]
        pos = f.end
    return "".join(out) + text[pos:]


def string_fields(obj, prefix: str = ""):
    """(field path, string) for every string in a record, e.g. ('conversations[1].value', '...')."""
    if isinstance(obj, str):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from string_fields(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from string_fields(v, f"{prefix}[{i}]")
