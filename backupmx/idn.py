"""Internationalised domain names and mailboxes (RFC 5890-5893, RFC 6531): checks and the A-label form.

Pure functions, no I/O. Relay control compares domains as A-labels
(`to_a_label`); an address a client sends with SMTPUTF8 must pass
`check_local_part` and its domain `to_a_label`.

Why not the stdlib's `idna` codec: it is IDNA 2003 (RFC 3490), which MAPS
what IDNA 2008 (RFC 5891) refuses. Nameprep folds case and applies NFKC, so
"ＥXAMPLE" (fullwidth), "\u212aelvin" (KELVIN SIGN) and "Fuß" all become
other names; it maps "ß" to "ss" and "ς" to "σ" (IDNA 2008 keeps both:
"fuß.de" and "fuss.de" are different domains, and the codec would send mail
for the first to the second's configuration); it drops ZERO WIDTH (NON-)JOINER
and SOFT HYPHEN; it treats U+3002, U+FF0E and U+FF61 as dots; and it knows
Unicode 3.2 only. Here nothing is mapped: a label must already be in the one
form IDNA 2008 allows, checked with `unicodedata` (the Unicode version of
this Python), and is then encoded with the stdlib's plain `punycode` codec
(RFC 3492, which has no mapping in it). The approximation of RFC 5892's
derived property PVALID:

  - the label is NFC (RFC 5891 5.2) and no character changes under NFKC or
    lower-casing (what makes fullwidth forms, KELVIN SIGN, upper case and
    compatibility characters DISALLOWED); ASCII letters are lower-cased
    first, as DNS is case-insensitive for them only;
  - only letters, combining marks, digits and "-" (general categories L*,
    Mn, Mc, Nd); no control, format (bidi overrides, zero-width joiners:
    CONTEXTJ rules are not implemented, so they are refused), space,
    symbol, punctuation (U+3002 and friends), private-use or unassigned
    character;
  - not starting with a combining mark; no "-" first or last, nor in the
    3rd and 4th position (RFC 5891 4.2.3.1, 4.2.3.2);
  - RFC 5893's Bidi Rule for a label holding right-to-left characters;
  - one script among Latin, Greek and Cyrillic per label (their look-alike
    letters are the classic homograph; RFC 5891 leaves such policy to the
    registry and the application). Script comes from the character's
    Unicode name, as the stdlib has no Script property.

What is not done: CONTEXTO rules (e.g. MIDDLE DOT between two "l"), and
exceptions that need the full RFC 5892 tables. Those characters are refused
or accepted by the rules above; a mistake there refuses a domain, it never
makes one domain match another, because matching is on the A-label, and the
A-label is checked to decode back to exactly the label given.
"""

import unicodedata

MAX_LABEL = 63
MAX_DOMAIN = 253  # without the trailing dot (RFC 1035 2.3.4: 255 octets on the wire)
_ACE = "xn--"
_LETTERS_AND_MARKS = frozenset({"Ll", "Lu", "Lt", "Lm", "Lo", "Mn", "Mc", "Nd"})
_RTL = frozenset({"R", "AL", "AN"})
# RFC 5893 section 2, rule 2: the bidi classes a right-to-left label may hold.
_RTL_ALLOWED = frozenset({"R", "AL", "AN", "EN", "ES", "CS", "ET", "ON", "BN", "NSM"})
_CONFUSABLE_SCRIPTS = frozenset({"LATIN", "GREEK", "CYRILLIC"})


class IDNError(ValueError):
    """Not a domain or local part we accept, with the reason."""


def _script(char: str) -> str | None:
    if char.isascii():
        return "LATIN" if char.isalpha() else None
    try:
        return unicodedata.name(char).split(" ")[0]
    except ValueError:
        return None


def check_u_label(label: str) -> None:
    """IDNAError unless `label` (non-ASCII, ASCII letters lower-cased) is a label IDNA 2008 allows."""
    if not unicodedata.is_normalized("NFC", label):
        raise IDNError("not in Unicode normalization form C")
    for char in label:
        if char == "-":
            continue
        if unicodedata.category(char) not in _LETTERS_AND_MARKS:
            raise IDNError(f"U+{ord(char):04X} is not a letter, mark or digit")
        if unicodedata.normalize("NFKC", char) != char or char.lower() != char:
            raise IDNError(f"U+{ord(char):04X} is not in the one form IDNA 2008 allows (upper case or compatibility)")
    if unicodedata.category(label[0]) in ("Mn", "Mc"):
        raise IDNError("starts with a combining mark")
    if label.startswith("-") or label.endswith("-") or label[2:4] == "--":
        raise IDNError("hyphen at the start, the end or in the 3rd and 4th position")
    _check_bidi(label)
    scripts = {_script(c) for c in label} & _CONFUSABLE_SCRIPTS
    if len(scripts) > 1:
        raise IDNError(f"mixes the scripts {' and '.join(sorted(scripts))}")


def _check_bidi(label: str) -> None:
    """RFC 5893 section 2, rules 1-4, for a label with right-to-left characters."""
    classes = [unicodedata.bidirectional(c) for c in label]
    if not _RTL & set(classes):
        return
    if classes[0] not in ("R", "AL"):
        raise IDNError("a right-to-left label must start with a right-to-left letter")
    if not set(classes) <= _RTL_ALLOWED:
        raise IDNError("left-to-right characters in a right-to-left label")
    ending = [c for c in classes if c != "NSM"]
    if not ending or ending[-1] not in ("R", "AL", "EN", "AN"):
        raise IDNError("a right-to-left label must end with a right-to-left letter or a digit")
    if "EN" in classes and "AN" in classes:
        raise IDNError("European and Arabic digits in one right-to-left label")


def _ascii_label(label: str) -> str:
    label = label.lower()
    if not label or len(label) > MAX_LABEL or label.startswith("-") or label.endswith("-") or not all(
            c.isalnum() or c == "-" for c in label):
        raise IDNError(f"bad label {label!r} (letters, digits and hyphens only)")
    if label.startswith(_ACE):
        _check_a_label(label)
    elif label[2:4] == "--":
        raise IDNError(f"bad label {label!r} (hyphens in the 3rd and 4th position are reserved)")
    return label


def _check_a_label(label: str) -> None:
    """An "xn--" label must decode to a valid U-label that encodes back to it (RFC 5891 5.4)."""
    try:
        u_label = label[len(_ACE):].encode("ascii").decode("punycode")
    except (UnicodeError, ValueError):
        raise IDNError(f"bad A-label {label!r}") from None
    if u_label.isascii():
        raise IDNError(f"bad A-label {label!r} (it encodes ASCII)")
    check_u_label(u_label)
    if _ACE + u_label.encode("punycode").decode("ascii") != label:
        raise IDNError(f"bad A-label {label!r} (not the canonical encoding)")


def to_a_label(label: str) -> str:
    """The A-label form of one label (ASCII labels lower-cased and checked; "xn--" labels validated)."""
    if label.isascii():
        return _ascii_label(label)
    label = "".join(c.lower() if c.isascii() else c for c in label)
    check_u_label(label)
    encoded = _ACE + label.encode("punycode").decode("ascii")
    if len(encoded) > MAX_LABEL:
        raise IDNError("label too long once encoded")
    return encoded


def to_a_domain(name: str) -> str:
    """A domain name in A-labels, lower case, no trailing dot; IDNError for anything else.

    Only U+002E separates labels: U+3002, U+FF0E and U+FF61 are refused (they
    are punctuation), never read as dots as IDNA 2003 would.
    """
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise IDNError("empty domain name")
    encoded = ".".join(to_a_label(label) for label in name.split("."))
    if len(encoded) > MAX_DOMAIN:
        raise IDNError(f"domain name too long ({len(encoded)} > {MAX_DOMAIN})")
    return encoded


def check_local_part(local: str) -> None:
    """RFC 6531 3.3: a local part may hold UTF-8 (RFC 6532 UTF8-non-ascii); we refuse what
    would be invisible or misleading: not NFC, control, format (bidi overrides,
    zero-width), separator, private-use, unassigned or surrogate characters."""
    if not unicodedata.is_normalized("NFC", local):
        raise IDNError("local part not in Unicode normalization form C")
    for char in local:
        if not char.isascii() and unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"):
            raise IDNError(f"U+{ord(char):04X} may not appear in an address")
