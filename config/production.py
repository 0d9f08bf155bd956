"""The one thing settings refuse: a production process with a public default secret.

Production is declared by setting `DEBUG=false` in the environment (or `.env`). Left unset,
DEBUG is off as well, but the development defaults are accepted, so that `bin/run`, the tests
and a fresh checkout work with no configuration at all.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

INSECURE_SECRET_KEY = "dev-only-insecure-secret-key-change-me"


def refuse_default_secrets(*, production: bool, secret_key: str, pepper: str) -> None:
    if not production:
        return
    defaults = [
        name
        for name, value in (("SECRET_KEY", secret_key), ("QUOTA_API_KEY_PEPPER", pepper))
        if value == INSECURE_SECRET_KEY
    ]
    if defaults:
        raise ImproperlyConfigured(
            f"DEBUG=false declares production, and {' and '.join(defaults)} "
            f"{'is' if len(defaults) == 1 else 'are'} still the public development default: "
            "set a long random value in the environment (docs/operations.md)."
        )
