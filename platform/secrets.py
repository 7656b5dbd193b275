"""Keeping secrets out of everything retro writes or logs.

A spec may interpolate a secret with `${env:WANDB_API_KEY}`; the value must then not land in
resolved.yaml, plan.json, manifests, stage logs or the tracker. Files a run keeps get the
placeholder back (`${env:NAME}`), so re-running resolved.yaml reads the secret again from the
environment; logs and trackers get `<redacted>`.
"""

from __future__ import annotations

import os
import re
from typing import Any

# Names that END in a secret word (HF_TOKEN, wandb_api_key, AWS_SECRET_ACCESS_KEY), so that
# `tokenizer` or `max_tokens` are not mistaken for secrets.
SECRET_NAME = re.compile(r"(^|[_-])(api[_-]?key|access[_-]?key|secret[_-]?key|token|secret|"
                         r"password|passwd|credentials?)$", re.I)
REDACTED = "<redacted>"


def env_secrets() -> dict[str, str]:
    """value -> variable name, for environment variables whose names look secret (values of 8+
    characters, longest first so that a secret containing another is replaced whole)."""
    found = {v: k for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}
    return dict(sorted(found.items(), key=lambda kv: len(kv[0]), reverse=True))


def redact(value: Any, secrets: list[str] | dict[str, str] | None = None) -> Any:
    """For logs and trackers: `<redacted>` for values under secret-looking keys (api_key,
    token, ...) and for every occurrence of a secret environment variable's value."""
    secrets = env_secrets() if secrets is None else secrets
    return _rewrite(value, {s: REDACTED for s in secrets}, redact_keys=True)


def restore_env_placeholders(value: Any, secrets: dict[str, str] | None = None) -> Any:
    """For files a run keeps (resolved.yaml, plan.json, manifests): put `${env:NAME}` back
    where a secret environment variable's value was interpolated, so the file stays runnable."""
    secrets = env_secrets() if secrets is None else secrets
    return _rewrite(value, {v: "${env:%s}" % name for v, name in secrets.items()},
                    redact_keys=False)


def _rewrite(value: Any, replace: dict[str, str], redact_keys: bool) -> Any:
    """`value` with every string's occurrences of `replace`'s keys replaced (in its order)."""
    if isinstance(value, dict):
        return {k: (REDACTED if redact_keys and SECRET_NAME.search(str(k))
                    else _rewrite(v, replace, redact_keys)) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, replace, redact_keys) for v in value]
    if isinstance(value, str):
        for old, new in replace.items():
            value = value.replace(old, new)
    return value
