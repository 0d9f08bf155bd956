"""Browser tests: Debian's headless chromium, driven by Playwright, against pytest-django's
`live_server` (which also serves the static files, from the finders).

Fixtures
    browser        a Playwright `Browser` shared by the tests of this package; the test skips
                   with the reason when chromium (`CHROMIUM_PATH`, default /usr/bin/chromium)
                   or the playwright package is missing. `bin/test` installs chromium.
    page           a `Page` in a fresh context (own cookies), `base_url` = live_server.url, so
                   `page.goto("/admin/")` works; a full-page screenshot is saved on failure.
    js_errors      the page's uncaught exceptions and console errors, as a list of strings.
    make_user      make_user(username, superuser=False, tenants=()): a staff user whose
                   password is PASSWORD; non-superusers join the "Tenant owners" group and
                   become owners of `tenants`.
    login          login(page, user, password=PASSWORD, next="/admin/"): logs in through
                   the admin's login form and waits for `next`.
    shot           shot(page, name): saves var/artifacts/screenshots/<module>.<test>/NN-name.png
                   (a 1280x800 window, the full page) and asserts that the page does not
                   scroll horizontally at that width.

The live server runs in a thread with its own database connection, so browser tests need
`@pytest.mark.django_db(transaction=True)`. Example:

    pytestmark = pytest.mark.django_db(transaction=True)

    def test_features(page, make_user, login, shot, world):
        owner = make_user("ann@acme.example", tenants=[world.tenant])
        login(page, owner)
        page.goto("/admin/tenants/feature/")
        shot(page, "features")
        assert page.get_by_role("link", name="acme/chat").is_visible()
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

PASSWORD = "browser-test-password"
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
# Without the networking switches Chromium's own background connections are refused on
# networks without internet access, and it stalls.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000
WIDTH = 1280  # a laptop: every console page fits it without scrolling sideways
SCREENSHOTS = Path(settings.BASE_DIR) / "var" / "artifacts" / "screenshots"
OWNER_GROUP = "Tenant owners"

_failed = pytest.StashKey[bool]()
_errors = pytest.StashKey[list[str]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember a failed test body, so that `page` can take a screenshot before it closes."""
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_failed] = True
    return report


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(
            os.environ.get("BROWSER_UNAVAILABLE")
            or f"{CHROMIUM} is missing: bin/test installs Debian's chromium when run as root"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: .venv/bin/pip install -e '.[dev]'")
    # Playwright's sync API keeps an asyncio loop marked as running in this thread, which
    # Django takes for async code and refuses ORM calls; the tests' own code is synchronous.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        playwright = sync_playwright().start()
        try:
            launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            yield launched
            launched.close()
        finally:
            playwright.stop()


def _artifact_dir(item: pytest.Item) -> Path:
    module = Path(str(item.path)).stem
    return SCREENSHOTS / re.sub(r"[^\w.-]+", "_", f"{module}.{item.name}")


@pytest.fixture
def page(browser: Browser, live_server: Any, request: pytest.FixtureRequest) -> Iterator[Page]:
    shutil.rmtree(_artifact_dir(request.node), ignore_errors=True)
    context = browser.new_context(
        base_url=str(live_server.url), viewport={"width": WIDTH, "height": 800}
    )
    context.set_default_timeout(TIMEOUT_MS)
    new_page = context.new_page()
    errors: list[str] = []
    new_page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))

    def on_console(msg: ConsoleMessage) -> None:
        url = msg.location.get("url", "")
        # Chromium asks for /favicon.ico by itself; the admin has none.
        if msg.type == "error" and not url.endswith("/favicon.ico"):
            errors.append(f"console: {msg.text} ({url})")

    new_page.on("console", on_console)
    request.node.stash[_errors] = errors
    yield new_page
    if request.node.stash.get(_failed, False):
        target = _artifact_dir(request.node) / "failure.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            new_page.screenshot(path=str(target), full_page=True)
        except Exception as exc:  # the page may be what broke; keep the test's own error
            print(f"no failure screenshot: {exc}")
        else:
            print(f"failure screenshot: {target}")
    context.close()


@pytest.fixture
def js_errors(page: Page, request: pytest.FixtureRequest) -> list[str]:
    return request.node.stash[_errors]


@pytest.fixture
def shot(request: pytest.FixtureRequest) -> Callable[[Page, str], Path]:
    counter = iter(range(1, 1000))

    def take(page: Page, name: str) -> Path:
        target = _artifact_dir(request.node) / f"{next(counter):02d}-{_slug(name)}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), full_page=True)
        scroll_width = page.evaluate("() => document.documentElement.scrollWidth")
        assert scroll_width <= WIDTH, f"{page.url} is {scroll_width} px wide (see {target})"
        return target

    return take


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "page"


def owner_group() -> Any:
    """The "Tenant owners" group. Migrations create it, but a transactional test's flush
    empties every table (post_migrate brings back only content types and permissions), so
    it is rebuilt when missing by replaying the migrations that name it."""
    from django.contrib.auth.models import Group
    from django.db import connection
    from django.db.migrations.loader import MigrationLoader
    from django.db.migrations.operations import RunPython

    group = Group.objects.filter(name=OWNER_GROUP).first()
    if group is not None:
        return group
    loader = MigrationLoader(connection)
    plan: list[tuple[str, str]] = []
    for leaf in loader.graph.leaf_nodes():
        plan += [key for key in loader.graph.forwards_plan(leaf) if key not in plan]
    for key in plan:
        migration = loader.get_migration(*key)
        module = importlib.import_module(type(migration).__module__)
        if OWNER_GROUP not in [v for v in vars(module).values() if isinstance(v, str)]:
            continue
        apps = loader.project_state(key, at_end=True).apps
        for operation in migration.operations:
            if isinstance(operation, RunPython):
                operation.code(apps, None)
    return Group.objects.get(name=OWNER_GROUP)


@pytest.fixture
def make_user(transactional_db: None) -> Callable[..., Any]:
    from tests.factories import UserFactory

    def make(username: str, *, superuser: bool = False, tenants: Iterable[Any] = ()) -> Any:
        user = UserFactory(username=username, is_superuser=superuser, is_staff=True)
        user.set_password(PASSWORD)
        user.save()
        if not superuser:
            user.groups.add(owner_group())
        for tenant in tenants:
            tenant.owners.add(user)
        return user

    return make


@pytest.fixture
def login() -> Callable[..., None]:
    def log_in(page: Page, user: Any, password: str = PASSWORD, next: str = "/admin/") -> None:
        page.goto(f"/admin/login/?next={next}")
        page.fill("#id_username", str(user.get_username()))
        page.fill("#id_password", password)
        page.locator('#login-form [type="submit"]').click()
        page.wait_for_load_state()
        error = page.locator(".errornote")
        if error.count():
            raise AssertionError(f"login of {user.get_username()} failed: {error.inner_text()}")
        page.wait_for_url(f"**{next}")
        page.locator("#user-tools").wait_for()

    return log_in
