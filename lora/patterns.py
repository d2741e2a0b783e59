"""Module-name patterns users write (target_modules, rank_pattern, alpha_pattern), matched in linear time.

Patterns come from files and clients, so they are matched with RE2 (google-re2), whose time is linear in the
name's length whatever the pattern: `(.*.*)*Z` cannot hold the process for minutes as Python's `re` would.
RE2 lacks backreferences and lookaround; a pattern that needs them is refused with a LoraError.
"""
import functools
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import re2

from .errors import LoraError

REGEX_CHARS = set("*+?[]()|^$\\")
MAX_PATTERNS = 4096  # keys of one rank_pattern/alpha_pattern; a saved checkpoint writes one per module at most

T = TypeVar("T")
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would also print each refused pattern to stderr


def is_regex(pattern: str) -> bool:
    """Whether a target_modules entry is a regex (else a module name or a dotted suffix of one)."""
    return any(c in REGEX_CHARS for c in pattern)


@functools.lru_cache(maxsize=2 * MAX_PATTERNS)  # every key of a config's rank_pattern and alpha_pattern stays compiled
def _compiled(pattern: str) -> Any:
    return re2.compile(pattern, _OPTIONS)


def _regex(pattern: str, what: str) -> Any:
    """`pattern` compiled; a LoraError naming `what` if RE2 refuses it."""
    try:
        return _compiled(pattern)
    except re2.error:
        check_pattern(pattern, what)
        raise


def check_pattern(pattern: str, what: str) -> None:
    """Raise a LoraError starting with `what` unless RE2 can match `pattern`."""
    try:
        re2.compile(pattern, _OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        try:
            re.compile(pattern)
        except re.error:
            raise LoraError(f"{what} is not a valid regex ({reason})") from None
        raise LoraError(f"{what} uses a regex feature that cannot be matched in linear time ({reason}); "
                        "write it without backreferences or lookaround") from None


def fullmatch(pattern: str, name: str, what: str = "pattern") -> bool:
    """Whether `pattern` matches all of `name`; a LoraError naming `what` if the pattern is refused."""
    return _regex(pattern, f"{what} {pattern!r}").fullmatch(name) is not None


def matches_key(key: str, name: str) -> bool:
    """PEFT's rank_pattern/alpha_pattern rule: the key matches the whole name or a dotted suffix of it."""
    try:
        regex = _compiled(rf"(?:.*\.)?(?:{key})")
    except re2.error:
        check_pattern(key, f"pattern key {key!r}")  # names the key as written
        raise LoraError(f"pattern key {key!r} cannot be wrapped as (?:.*\\.)?(?:key); close every group "
                        "and quote in it") from None
    return regex.fullmatch(name) is not None


def pattern_key(patterns: Mapping[str, object] | None, name: str) -> str | None:
    """The first key (in order) that matches `name`, as PEFT picks it; None if none does."""
    return next((key for key in patterns or {} if matches_key(key, name)), None)


def pattern_value(patterns: Mapping[str, T] | None, name: str, default: T) -> T:
    """The value of the first key (in order) that matches `name`, else `default`."""
    key = pattern_key(patterns, name)
    return default if key is None or patterns is None else patterns[key]
