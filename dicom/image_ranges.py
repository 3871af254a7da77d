"""The ``images`` string of a series: CIRCUS's multi-integer-range form (``"1-3,5,8-10"``)."""
import re

RANGE_ITEM_RE = re.compile(r"^(0|[1-9]\d*)(?:-(0|[1-9]\d*))?$")


class ImagesStringError(ValueError):
    """Raised when an ``images`` string does not follow the multi-integer-range grammar."""


def parse_ranges(text):
    """The ``(first, last)`` pairs of an images string, sorted and merged.

    Parameters
    ----------
    text : str
        ``"1-3,5"``; an empty string means no image.

    Raises
    ------
    ImagesStringError
        When ``text`` does not follow ``^(int|int-int)(,(int|int-int))*$``.
    """
    if text is None or text == "":
        return []
    pairs = []
    for item in text.split(","):
        match = RANGE_ITEM_RE.match(item)
        if match is None:
            raise ImagesStringError(f"Invalid images string: {text!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        pairs.append((min(first, last), max(first, last)))
    return _merged(pairs)


def _merged(pairs):
    merged = []
    for first, last in sorted(pairs):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def parse_images(text):
    """The instance numbers of an images string, as a sorted list of ints."""
    return [n for first, last in parse_ranges(text) for n in range(first, last + 1)]


def images_string(numbers):
    """The normalised images string of a collection of instance numbers (``"1-3,5"``)."""
    items = []
    run_start = previous = None
    for number in sorted(set(int(n) for n in numbers)):
        if previous is not None and number == previous + 1:
            previous = number
            continue
        if run_start is not None:
            items.append(_range_item(run_start, previous))
        run_start = previous = number
    if run_start is not None:
        items.append(_range_item(run_start, previous))
    return ",".join(items)


def _range_item(first, last):
    return str(first) if first == last else f"{first}-{last}"


def merge_images(text, numbers):
    """The images string ``text`` with ``numbers`` added (``"1-3,5"`` + [4] -> ``"1-5"``)."""
    pairs = parse_ranges(text) + [(int(n), int(n)) for n in numbers]
    return ",".join(_range_item(a, b) for a, b in _merged(pairs))


def has_image(text, number):
    """Whether instance ``number`` is in the images string ``text``."""
    return any(first <= number <= last for first, last in parse_ranges(text))
