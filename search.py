"""The search protocol of list endpoints: ?filter, ?sort, ?limit, ?page -> SQLAlchemy.

A filter is CIRCUS's Extended-JSON subset of MongoDB queries. It is validated against the
endpoint's allow-list and compiled to SQLAlchemy expressions with bound parameters only: no
user text ever becomes SQL or a server-side regular expression. ``$regex`` is accepted in
the form CIRCUS clients send (an escaped literal with optional ``^``/``$`` and option ``i``)
and compiled to LIKE.

Fields are SQLAlchemy column expressions, or ``ArrayField`` for stored arrays, which match
when any element matches (MongoDB semantics) through an indexed EXISTS.
"""
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa
from flask import current_app, jsonify, request

import table_versions
from auth import can_search_patient_info
from errors import ApiError
from models import db, parse_iso
from validation import JsonTooDeep, decode_json

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 20
MAX_LIMIT = 200
UNLIMITED = 9999
MAX_SORT_KEYS = 5
MAX_OFFSET = 2 ** 62  # past any table; larger offsets do not fit the databases' integers
MEMO_SIZE = 256  # statement pairs kept per app (see run(memo=...))
INT64 = 2 ** 63
COMPARISONS = {"$gt": "__gt__", "$gte": "__ge__", "$lt": "__lt__", "$lte": "__le__"}
OPERATORS = set(COMPARISONS) | {"$ne", "$in", "$all"}


class BadFilter(ApiError):
    """Raised when a filter is syntactically valid JSON but not allowed."""

    def __init__(self, message="Bad filter."):
        super().__init__(400, message)


@dataclass(frozen=True)
class Regex:
    """A decoded ``{"$regex": ..., "$options": ...}`` literal."""
    pattern: str
    options: str = ""


@dataclass(frozen=True)
class ArrayField:
    """A stored array: ``element`` is the element column, ``where`` correlates its rows."""
    element: object
    where: tuple

    def __init__(self, element, *where):
        object.__setattr__(self, "element", element)
        object.__setattr__(self, "where", where)


# --- Extended JSON ----------------------------------------------------------------------

def _decode_date(value):
    if isinstance(value, dict) and set(value) == {"$numberLong"}:
        value = value["$numberLong"]
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise BadFilter() from None
    if isinstance(value, bool):
        raise BadFilter()
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(value / 1000, timezone.utc).replace(tzinfo=None)
        except (OverflowError, OSError, ValueError):
            raise BadFilter() from None
    if isinstance(value, str):
        try:
            return parse_iso(value)
        except ValueError:
            raise BadFilter() from None
    raise BadFilter()


def decode_extended_json(value):
    """Turn ``$date`` and ``$regex`` literals into datetime and Regex, recursively."""
    if isinstance(value, list):
        return [decode_extended_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$date"}:
            return _decode_date(value["$date"])
        if "$regex" in value and set(value) <= {"$regex", "$options"}:
            pattern, options = value["$regex"], value.get("$options", "")
            if not isinstance(pattern, str) or not isinstance(options, str):
                raise BadFilter()
            return Regex(pattern, options)
        return {k: decode_extended_json(v) for k, v in value.items()}
    return value


# --- regex -> LIKE ----------------------------------------------------------------------

_META = set(".^$*+?()[]{}|\\")


def regex_to_like(regex):
    """Translate an escaped-literal regex to a LIKE pattern, or ApiError 400."""
    if set(regex.options) - {"i"}:
        raise ApiError(400, "Unsupported regular expression option.")
    pattern = regex.pattern
    anchored_start = pattern.startswith("^")
    if anchored_start:
        pattern = pattern[1:]
    # "$" ends the pattern unless escaped, i.e. preceded by an odd number of backslashes
    backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
    anchored_end = pattern.endswith("$") and backslashes % 2 == 0
    if anchored_end:
        pattern = pattern[:-1]
    literal, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1].isalnum():
                raise ApiError(400, "Only escaped literal regular expressions are supported.")
            literal.append(pattern[i + 1])
            i += 2
            continue
        if char in _META:
            raise ApiError(400, "Only escaped literal regular expressions are supported.")
        literal.append(char)
        i += 1
    text = "".join(literal).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return (("" if anchored_start else "%") + text + ("" if anchored_end else "%"),
            "i" in regex.options)


# --- compilation ------------------------------------------------------------------------

def _is_scalar(value):
    return isinstance(value, (str, int, float, bool, datetime, Regex)) and value is not None


def _python_type(column):
    try:
        return column.type.python_type
    except (NotImplementedError, AttributeError):
        return None


def _compatible(column, value):
    """Whether a value can equal a column's values (MongoDB never matches across types)."""
    kind = _python_type(column)
    if kind is None or isinstance(value, Regex):
        return True
    if kind is datetime:
        return isinstance(value, datetime)
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True


def _equals(column, value):
    if isinstance(value, Regex):
        like, insensitive = regex_to_like(value)
        if _python_type(column) not in (None, str):
            return sa.false()  # MongoDB: a regex never matches a number or a date
        return column.ilike(like, escape="\\") if insensitive else column.like(like, escape="\\")
    if not _compatible(column, value):
        return sa.false()
    return column == value


def _element_condition(column, op, operand):
    """Condition on one (scalar) value for one operator."""
    if op is None:
        return _equals(column, operand)
    if op in COMPARISONS:
        if isinstance(operand, Regex):
            raise BadFilter()
        if not _compatible(column, operand):
            return sa.false()
        return getattr(column, COMPARISONS[op])(operand)
    if op == "$in":
        values = [v for v in operand if not isinstance(v, Regex) and _compatible(column, v)]
        conds = [_equals(column, v) for v in operand if isinstance(v, Regex)]
        if values:
            conds.append(column.in_(values))
        return sa.or_(*conds) if conds else sa.false()
    raise BadFilter()


def _field_condition(field, op, operand):
    """Condition for one operator on a field (scalar column or ArrayField)."""
    if isinstance(field, ArrayField):
        def any_element(o, operand_):
            return sa.exists().where(*field.where, _element_condition(field.element, o, operand_))
        if op == "$ne":
            return ~any_element(None, operand)
        if op == "$all":
            return sa.and_(sa.true(), *[any_element(None, v) for v in operand])
        return any_element(op, operand)
    if op == "$ne":
        # MongoDB: $ne also matches documents where the field is missing.
        return sa.or_(~_equals(field, operand), field.is_(None))
    if op == "$all":
        return sa.and_(sa.true(), *[_equals(field, v) for v in operand])
    return _element_condition(field, op, operand)


class _Compiler:
    def __init__(self, fields, config):
        self.fields = fields
        self.max_depth = config["FILTER_MAX_DEPTH"]
        self.max_in = config["FILTER_MAX_IN_LENGTH"]
        self.keys = set()

    def filter(self, obj, depth=1):
        if depth > self.max_depth:
            raise ApiError(400, f"The filter is nested too deeply (at most {self.max_depth} levels).")
        if not isinstance(obj, dict):
            raise BadFilter()
        conds = []
        for key, value in obj.items():
            if key in ("$and", "$or"):
                if not isinstance(value, list) or not value:
                    raise BadFilter()
                parts = [self.filter(sub, depth + 1) for sub in value]
                conds.append(sa.and_(*parts) if key == "$and" else sa.or_(*parts))
            elif key in self.fields:
                self.keys.add(key)
                conds.append(self.field(self.fields[key], value))
            else:
                raise BadFilter()
        return sa.and_(sa.true(), *conds)

    def field(self, field, value):
        if _is_scalar(value):
            return _field_condition(field, None, value)
        if not isinstance(value, dict) or not value or set(value) - OPERATORS:
            raise BadFilter()
        conds = []
        for op, operand in value.items():
            if op in ("$in", "$all"):
                if not isinstance(operand, list) or not all(_is_scalar(v) for v in operand):
                    raise BadFilter()
                if len(operand) > self.max_in:
                    raise ApiError(400, f"Too many values in {op} (at most {self.max_in}).")
            elif not _is_scalar(operand):
                raise BadFilter()
            conds.append(_field_condition(field, op, operand))
        return sa.and_(*conds)


def _parse_int(text):
    # MongoDB keeps larger integers as doubles; as Python ints they would not fit a parameter.
    value = int(text)
    return value if -INT64 <= value < INT64 else float(text)


def _json_depth(value):
    """Nesting depth of parsed JSON, computed without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in
                         (node.values() if isinstance(node, dict) else node))
    return deepest


def compile_filter(text, fields, parse_error="Invalid JSON was passed as a filter string",
                   patient_info_allowed=None):
    """Compile a filter string to a SQLAlchemy condition (ApiError 400 when not allowed)."""
    if text is None or text == "":
        return sa.true()
    config = current_app.config
    if len(text) > config["FILTER_MAX_CHARS"]:
        raise ApiError(400, f"The filter is too large (at most {config['FILTER_MAX_CHARS']} characters).")
    too_deep = ApiError(400, "The filter is nested too deeply "
                             f"(at most {config['FILTER_MAX_DEPTH']} levels).")
    try:
        raw = decode_json(text, parse_int=_parse_int)
    except JsonTooDeep:
        raise too_deep from None
    except ValueError:
        raise ApiError(400, parse_error) from None
    # Each $and/$or level is two JSON levels; a field adds at most four ($in, $date, ...).
    if _json_depth(raw) > 2 * config["FILTER_MAX_DEPTH"] + 3:
        raise too_deep
    compiler = _Compiler(fields, config)
    condition = compiler.filter(decode_extended_json(raw))
    if any(k.startswith("patientInfo") for k in compiler.keys):
        if patient_info_allowed is None:
            patient_info_allowed = can_search_patient_info()
        if not patient_info_allowed:
            raise ApiError(400, "You cannot search using patient information.")
    return condition


def compile_sort(text, fields, default, sort_error="Bad sort parameter. Invalid JSON."):
    """ORDER BY clauses from a sort string; unknown keys are ignored, as sorting by a missing
    field is in MongoDB."""
    if text is None:
        spec = default
    else:
        try:
            spec = decode_json(text)
        except ValueError:
            raise ApiError(400, sort_error) from None
        if not isinstance(spec, dict):
            raise ApiError(400, "Bad sort parameter. Non-object passed.")
        if len(spec) > MAX_SORT_KEYS:
            raise ApiError(400, "Bad sort parameter. Too many sort keys.")
        for value in spec.values():
            if isinstance(value, bool) or value not in (1, -1):
                raise ApiError(400, "Bad sort parameter. Invalid key/value pair.")
    clauses = []
    for key, direction in spec.items():
        column = fields.get(key)
        if column is not None and not isinstance(column, ArrayField):
            clauses.append(column.asc() if direction == 1 else column.desc())
    return clauses


def paging(unlimited_allowed=False):
    """(limit, page) from the query string; CIRCUS's limits, with quirk 28 clamping."""
    if unlimited_allowed and "unlimited" in request.args:
        return UNLIMITED, 1
    try:
        limit = int(request.args.get("limit", DEFAULT_LIMIT))
    except ValueError:
        limit = DEFAULT_LIMIT
    if limit > MAX_LIMIT and not unlimited_allowed:
        raise ApiError(400, f"You cannot query more than {MAX_LIMIT} items at a time.")
    limit = max(1, min(limit, UNLIMITED))
    try:
        page = max(1, int(request.args.get("page", 1)))
    except ValueError:
        page = 1
    return limit, page


@dataclass(frozen=True, eq=False)
class SearchSpec:
    """What a list endpoint searches, declared by its domain module (a module constant, or a
    function of the caller's privileges when the allow-list or serializer depends on them).

    Attributes
    ----------
    fields : dict
        Filter key -> column expression or ArrayField (the endpoint's allow-list).
    serialize : callable
        Row (as returned by the query) -> JSON document; or, if it has ``many=True``
        as an attribute (``batch``), a callable taking the whole page (to batch look-ups).
    default_sort : dict
        CIRCUS's default sort, e.g. ``{"createdAt": -1}``.
    sort_fields : dict, optional
        Sortable key -> column; defaults to ``fields``.
    unlimited_allowed : bool
        ``?unlimited`` and limits above MAX_LIMIT accepted (three admin lists).
    filter_allowed : bool
        False: ``?filter`` is ignored, as CIRCUS's admin lists do.
    count_cap : int, optional
        ``totalItems`` counts no further than this.
    parse_error, sort_error : str
        The endpoint's words for a filter or sort that is not JSON.
    count_tables : tuple of str
        With a ``memo`` key (``run``): every table the counted rows depend on; the total
        is then counted again only after one of them changed (``table_versions``).
    plain_rows : bool
        The query selects columns, no ORM entity: its statements then run on the session's
        connection (SQLAlchemy Core), which skips the ORM's result processing (measured:
        a sixth of the time of a 20-row series list view).
    """
    fields: dict
    serialize: object
    default_sort: dict
    sort_fields: dict = None
    unlimited_allowed: bool = False
    filter_allowed: bool = True
    count_cap: int = None
    parse_error: str = "Invalid JSON was passed as a filter string"
    sort_error: str = "Bad sort parameter. Invalid JSON."
    count_tables: tuple = ()
    plain_rows: bool = False


def run(spec, query, memo=None, patient_info_allowed=None):
    """Run a list endpoint: filter, count, sort and page ``query``; return the envelope.

    Parameters
    ----------
    spec : SearchSpec
    query : Select or callable
        The candidate rows, already restricted to what the caller may see; or a function
        returning them, called only when ``memo`` finds no statements.
    memo : hashable, optional
        A key that alone determines ``query`` and ``spec``'s fields (the endpoint's name
        and every privilege the query depends on). Requests with the same key and query
        string then reuse the statements built for the first one (see ``_Statements``).
        Leave it out wherever the query depends on anything else.
    patient_info_allowed : bool, optional
        Whether the filter may name patientInfo.* keys; by default auth decides.
    """
    fields, filter_allowed, count_cap = spec.fields, spec.filter_allowed, spec.count_cap
    if patient_info_allowed is None and filter_allowed:
        patient_info_allowed = can_search_patient_info()
    limit, page = paging(spec.unlimited_allowed)
    offset = min(limit * (page - 1), MAX_OFFSET)
    args = (request.args.get("filter") if filter_allowed else None, request.args.get("sort"),
            limit, offset, count_cap, patient_info_allowed)

    def build():
        selected = query() if callable(query) else query
        if filter_allowed:
            selected = selected.where(compile_filter(args[0], fields, spec.parse_error,
                                                     patient_info_allowed))
        order = compile_sort(args[1], spec.sort_fields or fields, spec.default_sort,
                             spec.sort_error)
        return _Statements(selected, order, limit, offset, count_cap)

    if memo is None:
        statements = build()
    else:
        statements = table_versions.app_memo("circus.search_statements", MEMO_SIZE).get(
            (memo, args), build)
    if spec.plain_rows:
        db.session.flush()  # what the session's execute would do first (autoflush)
        execute = db.session.connection().execute
    else:
        execute = db.session.execute
    result = execute(statements.page)
    rows = result.scalars().all() if len(result.keys()) == 1 else result.all()
    if len(rows) < limit and (rows or offset == 0):
        total = offset + len(rows)  # a short page is the last one: no COUNT needed
    elif memo is not None and spec.count_tables:
        total = table_versions.cached_count(
            (memo, args), spec.count_tables, lambda: execute(statements.count()).scalar_one())
    else:
        total = execute(statements.count()).scalar_one()
    if count_cap is not None:
        total = min(total, count_cap)
    if getattr(spec.serialize, "many", False):
        items = spec.serialize(rows)
    else:
        items = [spec.serialize(row) for row in rows]
    return jsonify({"items": items, "totalItems": total, "page": page})


class _Statements:
    """The page and COUNT statements of one search.

    Building them and computing SQLAlchemy's cache key of a new statement costs more than
    running it on an index; a statement object remembers its key, so reusing the objects
    (``table_versions.Memo``, one per app) leaves only the execution.
    """

    def __init__(self, query, order, limit, offset, count_cap):
        self.query = query
        self.page = query.order_by(*order).limit(limit).offset(offset)
        self.count_cap = count_cap
        self._count = None

    def count(self):
        if self._count is None:
            counted = self.query.order_by(None)
            if self.count_cap is not None:
                counted = counted.limit(self.count_cap)  # count no further than the cap
            self._count = sa.select(sa.func.count()).select_from(counted.subquery())
        return self._count



def batch(function):
    """Mark a serializer as taking the whole page at once (see ``SearchSpec.serialize``)."""
    function.many = True
    return function
