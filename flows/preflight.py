"""Everything the CLI checks before it starts a server, a cluster or a model: one line per problem, in a second.

A typo in `--set`, an unknown profile, a missing input or an output that is a file must not cost a Prefect server
start and two tracebacks: each raises `PreflightError` with the exit code a script can tell apart from
"videos failed" (the codes are the BSD sysexits ones, listed in the README and in `flows/cli.py`).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from schemas.config import CurateConfig, load_config

EX_USAGE = 64  # bad command line
EX_NOINPUT = 66  # the input does not exist
EX_SOFTWARE = 70  # a bug: an error nobody planned for
EX_CANTCREAT = 73  # the output cannot be written
EX_IOERR = 74  # stopped early: the machine (disk full, out of memory)
EX_TEMPFAIL = 75  # the output is in use by another run
EX_CONFIG = 78  # the configuration: profile, setting, weights, resources
MAX_FAILED_CODE = 63
"""Exit codes 1..63 count the videos that failed (63 = 63 or more): below every error code."""


class PreflightError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set faces.min_size_px=48 --set run.batch_size=4` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        path, eq, raw = pair.partition("=")
        if not eq or not path or any(not p for p in path.split(".")):
            raise PreflightError(EX_USAGE, f"--set expects key.path=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise PreflightError(
                EX_USAGE, f"--set {pair!r}: the value is not valid YAML ({e.problem})"
            ) from None
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise PreflightError(EX_USAGE, f"--set {pair!r} conflicts with another --set")
        node[leaf] = value
    return out


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for spelling suggestions)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def describe_validation_error(exc: ValidationError, model: type[BaseModel] = CurateConfig) -> str:
    """The first error of a config validation, as one sentence that says where and how to fix it."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc)
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    if err["type"] == "extra_forbidden":
        owner = _model_at(model, loc)
        hint = ""
        if owner is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1)
            if close:
                hint = f" (did you mean {'.'.join(str(p) for p in loc[:-1] + (close[0],))}?)"
        return f"unknown setting {where}{hint}{more}"
    given = err.get("input")
    shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
    return f"invalid setting {where}: {err['msg']}{shown}{more}"


def check_config(profile: str, overrides: dict[str, Any]) -> CurateConfig:
    try:
        return load_config(profile, overrides)
    except FileNotFoundError as e:
        raise PreflightError(EX_CONFIG, str(e)) from None
    except ValidationError as e:
        raise PreflightError(
            EX_CONFIG, describe_validation_error(e) + "; fix the --set value or the profile"
        ) from None
    except yaml.YAMLError as e:
        raise PreflightError(EX_CONFIG, f"profile {profile!r} is not valid YAML: {e}") from None


def check_input(source: str) -> None:
    from tasks.discovery import is_local, local_path

    if source == "builtin:samples":
        return
    if is_local(source):
        path = local_path(source)
        if any(c in path for c in "*?["):
            if not Path(path.split("*")[0].split("?")[0].split("[")[0] or ".").parent.exists():
                raise PreflightError(EX_NOINPUT, f"input {source}: the folder of this glob does not exist")
            return
        if not os.path.exists(path):
            raise PreflightError(EX_NOINPUT, f"input {source} does not exist")
        if not os.access(path, os.R_OK):
            raise PreflightError(EX_NOINPUT, f"input {source} cannot be read (permissions)")
        return
    _check_protocol(source, EX_NOINPUT)


def _check_protocol(url: str, code: int) -> None:
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise PreflightError(code, f"{url}: unknown protocol {protocol!r}") from None
    except ImportError as e:
        raise PreflightError(EX_CONFIG, f"{url}: {protocol}:// needs an extra package ({e})") from None


def check_output(output: str) -> None:
    from tasks.discovery import is_local, local_path

    if not is_local(output):
        _check_protocol(output, EX_CANTCREAT)
        return
    path = Path(local_path(output))
    if path.exists() and not path.is_dir():
        raise PreflightError(
            EX_CANTCREAT, f"output {output} is a file; give a directory (new or from an earlier run)"
        )
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PreflightError(EX_CANTCREAT, f"output {output} cannot be created: {parent} is not writable")


def check_weights(config: CurateConfig) -> None:
    """Every model the run will load is here (or downloadable); else one line naming all that are not."""
    from models.weights import missing

    specs = []
    if config.caption.source != "sidecar":
        specs.append(("caption", config.caption.model))
    specs += [("persons", config.persons.model), ("faces", config.faces.model)]
    if config.subjects:
        specs += [
            ("entities", config.entities.model),
            ("masks.grounder", config.masks.grounder),
            ("masks.segmenter", config.masks.segmenter),
            ("binding", config.binding.model),
            ("background", config.background.model),
        ]
    problems = [f"{stage}: {why}" for stage, spec in specs if (why := missing(spec)) is not None]
    if problems:
        raise PreflightError(
            EX_CONFIG,
            f"profile {config.profile!r} needs model weights this machine does not have ({'; '.join(problems)}). "
            "Download them (or point the model's `weights` at a local copy), or run with --profile offline "
            "(CPU, weights shipped in pip packages)",
        )


def take_lock(output: str):
    """Own the output now (refusing at once if another run does); the run this process starts adopts the lock."""
    from tasks.lock import OutputLock, OutputLocked
    from tasks.output import OutputDir

    lock = OutputLock(OutputDir(output))
    try:
        lock.hand_over()
    except OutputLocked as e:
        raise PreflightError(EX_TEMPFAIL, str(e)) from None
    return lock
