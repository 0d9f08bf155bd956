from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_wsgi_application()

# the reservation API's hot routes are answered in front of Django's handler (after setup)
from quotas.api.wsgi import FastPath  # noqa: E402

application = FastPath(django_application)
