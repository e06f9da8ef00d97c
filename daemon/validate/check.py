"""``gemini-batchd check FILE``: validate a file offline, as the daemon would, and say so."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from daemon.config import Config
from daemon.validate.rules import is_model_id, validate_file


def _default_model(cfg: Config, file: Path) -> str:
    """The folder name when the file sits in ``inbox/<model>/`` (or a folder that looks like a
    Gemini model id), else ``[gemini] default_model``."""
    folder = file.resolve().parent
    name = folder.name
    if is_model_id(name) and (
        folder.parent == cfg.inbox_dir.resolve() or name.startswith("gemini") or "embedding" in name
    ):
        return name
    return cfg.gemini.default_model


def check_main(cfg: Config, file: str, *, model: str | None, as_json: bool) -> int:
    """``gemini-batchd check FILE``: validate offline as the daemon would; 0 ok, 1 problems."""
    path = Path(file)
    model = model or _default_model(cfg, path)
    try:
        if not path.is_file():
            raise OSError(0, "not a regular file" if path.exists() else "no such file")
        v = validate_file(path, model=model, cfg=cfg)
    except OSError as e:
        if as_json:
            sys.stdout.write(
                orjson.dumps(
                    {"file": file, "model": model, "ok": False, "error": e.strerror}
                ).decode()
                + "\n"
            )
        else:
            print(f"{file}: cannot read: {e.strerror}", file=sys.stderr)
        return 1
    if as_json:
        doc = {
            "file": file,
            "model": model,
            "kind": v.kind,
            "ok": v.ok,
            "problems": [{"line": p.line, "reason": p.reason} for p in v.problems],
            "problem_count": v.problem_count,
            "request_count": v.request_count,
            "size_bytes": v.size_bytes,
            "sha256": v.sha256,
            "est_tokens": v.est_tokens,
            "media_refs": v.media_refs,
            "parts": [
                {
                    "part_no": p.part_no,
                    "first_line": p.first_line,
                    "last_line": p.last_line,
                    "request_count": p.request_count,
                    "size_bytes": p.size_bytes,
                }
                for p in v.parts
            ],
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0 if v.ok else 1
    for p in v.problems:
        print(f"{file}:{p.line}: {p.reason}" if p.line else f"{file}: {p.reason}")
    if v.ok:
        print(
            f"{file}: ok: {v.request_count} requests, {len(v.parts)} part(s), "
            f"{v.size_bytes} bytes, ~{v.est_tokens} tokens (model {model}, {v.kind})"
        )
        return 0
    more = f" (first {len(v.problems)} shown)" if v.problem_count > len(v.problems) else ""
    print(f"{file}: rejected: {v.problem_count} problem(s){more}; {v.request_count} request lines")
    return 1
