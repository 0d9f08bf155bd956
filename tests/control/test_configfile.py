"""`manage.py quota apply | export | key`: config as code, through the real command."""

from __future__ import annotations

import copy
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command, execute_from_command_line
from django.core.management.base import CommandError
from django.db import connection, models
from django.test.utils import CaptureQueriesContext

from providers.models import LanguageModel, Pool, Provider
from quotas.keys import api_key_hash
from quotas.models import ApiKey, Limit
from tenants.models import Feature, Tenant

pytestmark = pytest.mark.django_db

DEMO = Path(settings.BASE_DIR) / "demo" / "quota.yaml"
CONFIG_MODELS: list[type[models.Model]] = [
    Provider,
    LanguageModel,
    Pool,
    Tenant,
    Feature,
    Limit,
    get_user_model(),
]


def base_config() -> dict[str, Any]:
    """A small valid world: one pool of 1,000 tokens a minute, two tenants."""
    return copy.deepcopy(
        {
            "providers": [
                {
                    "slug": "openai",
                    "models": [
                        {"name": "gpt-4o-mini", "input_per_mtok": 0.15, "output_per_mtok": 0.6},
                        {"name": "gpt-4o", "input_per_mtok": 2.5, "output_per_mtok": 10},
                    ],
                }
            ],
            "pools": [{"slug": "shared", "provider": "openai", "models": ["gpt-4o-mini"]}],
            "tenants": [
                {
                    "slug": "acme",
                    "timezone": "Europe/Berlin",
                    "owners": ["ops@acme.example"],
                    "features": [
                        {"slug": "chat", "owner": "ana@acme.example", "priority": "interactive"}
                    ],
                },
                {"slug": "globex", "features": [{"slug": "triage", "owner": "cy@globex.example"}]},
            ],
            "limits": [
                {
                    "scope": {"pool": "shared"},
                    "metric": "tokens",
                    "window": "minute",
                    "amount": 1000,
                }
            ],
        }
    )


def write_config(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "quota.yaml"
    text = document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False)
    path.write_text(text)
    return path


def quota(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("quota", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def apply(tmp_path: Path, document: Any, *args: str) -> str:
    return quota("apply", str(write_config(tmp_path, document)), *args)[0]


def apply_refused(tmp_path: Path, document: Any) -> list[str]:
    """The error lines of a refused apply, having checked that the refusal says so."""
    out, err = StringIO(), StringIO()
    path = write_config(tmp_path, document)
    with pytest.raises(CommandError) as refused:
        call_command("quota", "apply", str(path), stdout=out, stderr=err)
    errors = err.getvalue().splitlines()
    plural = "s" if len(errors) != 1 else ""
    assert str(refused.value) == f"{len(errors)} error{plural} in {path}; nothing was written."
    assert out.getvalue() == ""
    return errors


def row_counts() -> dict[str, int]:
    counts = {m.__name__: m._default_manager.count() for m in CONFIG_MODELS}
    for model in (Tenant, Feature, Pool, Limit, LanguageModel, Provider):
        history = model.history.model  # type: ignore[attr-defined]
        counts[history.__name__] = history.objects.count()
    return counts


def totals(output: str) -> str:
    return output.splitlines()[-1]


# The demo and idempotency.


def test_demo_config_tells_the_products_story(tmp_path: Path) -> None:
    output = quota("apply", str(DEMO))[0]

    assert totals(output) == "26 created, 0 updated, 0 unchanged, 0 deleted"
    pool = Pool.objects.get(slug="openai-shared")
    assert pool.protect == {"interactive": 0.3}
    assert sorted(m.name for m in pool.served_models.all()) == ["gpt-4o", "gpt-4o-mini"]
    mini = LanguageModel.objects.get(name="gpt-4o-mini")
    assert (str(mini.input_per_mtok), str(mini.output_per_mtok)) == ("0.150000", "0.600000")
    acme = Tenant.objects.get(slug="acme")
    assert acme.timezone == "Europe/Berlin"
    chat = Feature.objects.get(tenant=acme, slug="chat")
    assert (chat.priority, chat.owner.email) == ("interactive", "ana@acme.example")
    assert Feature.objects.get(tenant=acme, slug="report-gen").priority == "batch"
    assert Feature.objects.filter(tenant__slug="globex", pools=pool).exists()
    budget = Limit.objects.get(tenant=acme, feature=None, metric="cost_usd", window="month")
    assert (budget.amount, budget.alert_at) == (500, [0.5, 0.8, 1.0])
    daily = Limit.objects.get(feature__slug="report-gen", metric="tokens", window="day")
    assert daily.enforcement == "soft"
    assert Limit.objects.get(feature=chat, pool=pool).guaranteed == 20000
    assert Limit.objects.filter(metric="concurrent", window="").count() == 2
    assert Limit.objects.get(pool=pool, feature=None, metric="requests").amount == 500


def test_owners_become_staff_users_without_a_password(tmp_path: Path) -> None:
    apply(tmp_path, base_config())

    ana = get_user_model().objects.get(username="ana@acme.example")
    assert (ana.email, ana.is_staff, ana.has_usable_password()) == ("ana@acme.example", True, False)
    assert [u.username for u in Tenant.objects.get(slug="acme").owners.all()] == [
        "ops@acme.example"
    ]


def test_apply_says_where_new_owners_set_their_password(tmp_path: Path) -> None:
    first = apply(tmp_path, base_config())
    assert first.splitlines()[0].endswith("/admin/password_reset/")
    assert "password" not in apply(tmp_path, base_config())  # no one new the second time


def test_tenant_owners_join_the_owner_group_so_they_can_use_the_admin(tmp_path: Path) -> None:
    apply(tmp_path, base_config())

    ops = get_user_model().objects.get(username="ops@acme.example")
    assert [g.name for g in ops.groups.all()] == ["Tenant owners"]
    assert ops.has_perm("tenants.change_feature")


def test_an_existing_user_is_used_as_it_is(tmp_path: Path) -> None:
    user_model = get_user_model()
    # A stand-in for a password hash: hashing a real one costs seconds on a small machine.
    ana = user_model.objects.create(username="ana", email="ana@acme.example", password="x$y")

    apply(tmp_path, base_config())

    assert Feature.objects.get(slug="chat").owner == ana
    ana.refresh_from_db()
    assert (ana.is_staff, ana.password) == (False, "x$y")
    assert not user_model.objects.filter(username="ana@acme.example").exists()


def test_a_second_apply_changes_nothing(tmp_path: Path) -> None:
    apply(tmp_path, base_config())
    before = row_counts()

    output = apply(tmp_path, base_config())

    assert totals(output) == "0 created, 0 updated, 12 unchanged, 0 deleted"
    assert row_counts() == before  # not even a history row: unchanged objects are not saved


def test_each_name_is_looked_up_once_however_often_the_file_repeats_it(tmp_path: Path) -> None:
    document = base_config()
    document["limits"] += [
        {"scope": {"tenant": "acme", "feature": "chat"}, "metric": metric, "window": window,
         "amount": 100}
        for metric, window in [("tokens", "minute"), ("tokens", "day"), ("requests", "minute"),
                               ("requests", "day"), ("input_tokens", "day")]
    ]  # fmt: skip
    apply(tmp_path, document)

    with CaptureQueriesContext(connection) as queries:
        apply(tmp_path, document)

    lookups = [q["sql"] for q in queries if q["sql"].startswith('SELECT "tenants_tenant"."id"')]
    by_slug = [sql for sql in lookups if '"tenants_tenant"."slug" =' in sql]
    # acme and globex, each once: as tenants (their upsert), then acme once for five limits
    assert len(by_slug) == 3, by_slug
    limits = [q["sql"] for q in queries if q["sql"].startswith('SELECT "quotas_limit"."id"')]
    # the stored limits read once, each of the six limits by its upsert, then the guarantees on
    # the pool whose capacity the file sets
    assert len(limits) == 1 + 6 + 1, limits


def test_demo_export_applies_as_a_no_op(tmp_path: Path) -> None:
    quota("apply", str(DEMO))
    exported = quota("export")[0]
    before = row_counts()

    output = apply(tmp_path, exported)

    assert totals(output) == "0 created, 0 updated, 26 unchanged, 0 deleted"
    assert row_counts() == before
    assert quota("export")[0] == exported


def test_export_reads_like_the_file_that_was_applied(tmp_path: Path) -> None:
    quota("apply", str(DEMO))

    exported = yaml.safe_load(quota("export")[0])

    assert [p["slug"] for p in exported["pools"]] == ["openai-shared"]
    assert exported["pools"][0]["protect"] == {"interactive": 0.3}
    chat_guarantee = {
        "scope": {"tenant": "acme", "feature": "chat", "pool": "openai-shared"},
        "metric": "tokens",
        "window": "minute",
        "guaranteed": 20000,
    }
    assert chat_guarantee in exported["limits"]
    concurrent = [lim for lim in exported["limits"] if lim["metric"] == "concurrent"]
    assert all("window" not in lim for lim in concurrent)
    assert exported["limits"][0]["scope"] == {"pool": "openai-shared"}  # pool-wide first


def test_export_round_trips_non_default_values(tmp_path: Path) -> None:
    config = base_config()
    config["providers"][0]["models"][0].update(
        cached_input_per_mtok=0.075, context_window=128000, chars_per_token=3.5
    )
    config["pools"][0].update(fail_mode="open", protect={"interactive": 0.2, "standard": 0.1})
    config["pools"].append(
        {"slug": "backup", "provider": "openai", "position": 7, "line_minutes": 2.5}
    )
    config["tenants"][1].update(status="suspended", name="Globex Inc")
    config["tenants"][0]["features"][0].update(status="paused", pools=["shared", "backup"])
    config["limits"].append(
        {
            "scope": {"model": "gpt-4o"},
            "metric": "cost_usd",
            "window": "day",
            "amount": 12.5,
            "enforcement": "shadow",
            "alert_at": [],
        }
    )
    apply(tmp_path, config)
    exported = quota("export")[0]

    output = apply(tmp_path, exported)

    assert "0 created, 0 updated" in totals(output)
    assert quota("export")[0] == exported
    assert "{name: gpt-4o-mini, input_per_mtok: 0.15, cached_input_per_mtok: 0.075" in exported
    assert "{scope: {model: gpt-4o}, metric: cost_usd, window: day, amount: 12.5" in exported
    assert "line_minutes: 2.5" in exported


# Updates, dry runs and pruning.


def test_applying_a_changed_amount_updates_the_same_limit(tmp_path: Path) -> None:
    apply(tmp_path, base_config())
    limit = Limit.objects.get()
    config = base_config()
    config["limits"][0]["amount"] = 2000

    output = apply(tmp_path, config)

    assert "updated    limit shared: tokens per minute (amount)" in output.splitlines()
    assert totals(output) == "0 created, 1 updated, 11 unchanged, 0 deleted"
    assert Limit.objects.get().pk == limit.pk
    assert Limit.objects.get().amount == 2000


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    before = row_counts()

    output = apply(tmp_path, base_config(), "--dry-run")

    assert totals(output) == (
        "12 created, 0 updated, 0 unchanged, 0 deleted (dry run: nothing was written)"
    )
    assert "created    feature acme/chat" in output.splitlines()
    assert row_counts() == before


def test_dry_run_says_which_fields_would_change(tmp_path: Path) -> None:
    apply(tmp_path, base_config())
    before = row_counts()
    config = base_config()
    config["pools"][0].update(fail_mode="open", protect={"interactive": 0.3})
    config["tenants"][0]["owners"].append("cto@acme.example")

    output = apply(tmp_path, config, "--dry-run")

    lines = output.splitlines()
    assert "updated    pool shared (fail_mode, protect)" in lines
    assert "updated    tenant acme (owners)" in lines
    assert "created    owner cto@acme.example" in lines
    assert row_counts() == before
    assert Pool.objects.get().fail_mode == "closed"


def test_limits_left_out_of_the_file_are_kept_without_prune(tmp_path: Path) -> None:
    config = base_config()
    config["limits"].append(
        {"scope": {"tenant": "acme"}, "metric": "requests", "window": "day", "amount": 10}
    )
    apply(tmp_path, config)

    output = apply(tmp_path, base_config())

    assert Limit.objects.count() == 2
    assert totals(output).endswith("0 deleted")


def test_prune_deletes_undeclared_limits_of_the_files_tenants_and_pools(tmp_path: Path) -> None:
    config = base_config()
    config["limits"] += [
        {"scope": {"tenant": "acme"}, "metric": "requests", "window": "day", "amount": 10},
        {"scope": {"tenant": "globex"}, "metric": "requests", "window": "day", "amount": 10},
    ]
    apply(tmp_path, config)
    outsider = {
        "tenants": [{"slug": "initech", "features": []}],
        "limits": [
            {"scope": {"tenant": "initech"}, "metric": "tokens", "window": "day", "amount": 5}
        ],
    }
    apply(tmp_path, outsider)
    config["limits"].pop(1)

    output = apply(tmp_path, config, "--prune")

    assert "deleted    limit acme: requests per day" in output.splitlines()
    assert totals(output).endswith("1 deleted")
    remaining = {(lim.tenant.slug if lim.tenant else "-") for lim in Limit.objects.all()}
    assert remaining == {"-", "globex", "initech"}  # initech is not in the file: untouched


def test_guarantees_can_move_between_features_in_one_apply(tmp_path: Path) -> None:
    def with_guarantees(chat: int, triage: int) -> dict[str, Any]:
        config = base_config()
        for tenant, feature, amount in (("acme", "chat", chat), ("globex", "triage", triage)):
            config["limits"].insert(
                0,  # before the pool's capacity: the order in the file must not matter
                {
                    "scope": {"tenant": tenant, "feature": feature, "pool": "shared"},
                    "metric": "tokens",
                    "window": "minute",
                    "guaranteed": amount,
                },
            )
        return config

    apply(tmp_path, with_guarantees(chat=300, triage=700))
    output = apply(tmp_path, with_guarantees(chat=800, triage=200))

    assert totals(output).startswith("0 created, 2 updated")
    assert sorted(Limit.objects.exclude(guaranteed=None).values_list("guaranteed", flat=True)) == [
        200,
        800,
    ]


def test_lowering_a_capacity_below_its_guarantees_is_refused(tmp_path: Path) -> None:
    config = base_config()
    config["limits"].append(
        {
            "scope": {"tenant": "acme", "feature": "chat", "pool": "shared"},
            "metric": "tokens",
            "window": "minute",
            "guaranteed": 600,
        }
    )
    apply(tmp_path, config)
    config["limits"][0]["amount"] = 500

    errors = apply_refused(tmp_path, config)

    assert errors == [  # the line that changed is the one to blame
        "limits[0].amount: guarantees on pool 'shared' would add up to 600 tokens per "
        "minute, more than its capacity of 500"
    ]
    assert Limit.objects.get(guaranteed=None).amount == 1000


def test_lowering_a_capacity_below_guarantees_set_elsewhere_is_refused_at_the_capacity(
    tmp_path: Path,
) -> None:
    apply(tmp_path, base_config())
    guarantee = {
        "scope": {"tenant": "acme", "feature": "chat", "pool": "shared"},
        "metric": "tokens",
        "window": "minute",
        "guaranteed": 600,
    }
    apply(tmp_path, {"limits": [guarantee]})  # another file, say the tenant's own
    config = base_config()
    config["limits"][0]["amount"] = 500

    assert apply_refused(tmp_path, config) == [
        "limits[0].amount: guarantees on pool 'shared' would add up to 600 tokens per "
        "minute, more than its capacity of 500"
    ]


def test_pools_take_their_position_from_the_file_unless_given(tmp_path: Path) -> None:
    config = base_config()
    config["pools"] = [
        {"slug": "zeta", "provider": "openai"},
        {"slug": "alpha", "provider": "openai"},
        {"slug": "mid", "provider": "openai", "position": 5},
    ]
    config["limits"] = []

    apply(tmp_path, config)

    assert list(Pool.objects.values_list("slug", "position")) == [
        ("zeta", 0),
        ("alpha", 1),
        ("mid", 5),
    ]


# Refusals: shape, references, and the way they are reported.


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    config = base_config()
    config["tenants"][0]["timezon"] = "UTC"
    config["limits"][0]["scope"]["feture"] = "chat"
    config["alert_channel"] = []

    errors = apply_refused(tmp_path, config)

    assert errors == [
        "alert_channel: unknown key "
        "(expected one of providers, pools, tenants, limits, alert_channels)",
        "tenants[0].timezon: unknown key "
        "(expected one of slug, name, timezone, status, owners, features)",
        "limits[0].scope.feture: unknown key (expected one of tenant, feature, pool, model)",
    ]
    assert set(row_counts().values()) == {0}


def test_wrong_types_and_choices_are_errors(tmp_path: Path) -> None:
    config = base_config()
    config["limits"][0].update(amount="lots", metric="token")
    config["tenants"][0]["features"][0]["priority"] = "urgent"
    del config["pools"][0]["provider"]

    errors = apply_refused(tmp_path, config)

    assert errors == [
        "pools[0].provider: missing (required)",
        "tenants[0].features[0].priority: 'urgent' is not one of "
        "interactive, standard, batch, background",
        "limits[0].amount: expected a number, got 'lots'",
        "limits[0].metric: 'token' is not one of "
        "requests, tokens, input_tokens, output_tokens, cost_usd, concurrent",
    ]


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    text = "tenants:\n  - slug: acme\n    timezone: UTC\n    timezone: Europe/Berlin\n"

    assert apply_refused(tmp_path, text) == [
        f"{tmp_path / 'quota.yaml'}: line 4, column 5: key 'timezone' is given twice"
    ]


def test_a_file_that_is_not_yaml_is_an_error(tmp_path: Path) -> None:
    errors = apply_refused(tmp_path, "tenants:\n  - slug: [acme\n")

    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'quota.yaml'}: line 3, column 1: ")


def test_every_error_is_listed_and_nothing_is_written(tmp_path: Path) -> None:
    config = base_config()
    config["tenants"][0]["timezone"] = "Mars/Base"
    config["pools"][0]["models"].append("gpt-5")
    config["limits"][0]["amount"] = 0
    config["limits"].append(
        {
            "scope": {"tenant": "globex", "feature": "chat"},
            "metric": "tokens",
            "window": "day",
            "amount": 10,
        }
    )

    errors = apply_refused(tmp_path, config)

    assert errors == [
        "pools[0].models[1]: provider 'openai' has no model 'gpt-5'",
        "tenants[0].timezone: 'Mars/Base' is not an IANA time zone (for example Europe/Berlin).",
        "limits[0].amount: The amount must be greater than zero.",
        "limits[1].scope.feature: no feature 'chat' in tenant 'globex'",
    ]
    assert set(row_counts().values()) == {0}


def test_entries_that_refer_to_a_broken_entry_are_not_reported_again(tmp_path: Path) -> None:
    config = base_config()
    config["tenants"][0]["timezone"] = "Mars/Base"
    config["limits"].append(
        {
            "scope": {"tenant": "acme", "feature": "chat"},
            "metric": "tokens",
            "window": "day",
            "amount": 10,
        }
    )

    assert apply_refused(tmp_path, config) == [
        "tenants[0].timezone: 'Mars/Base' is not an IANA time zone (for example Europe/Berlin)."
    ]


def test_an_object_declared_twice_is_an_error(tmp_path: Path) -> None:
    config = base_config()
    config["tenants"].append({"slug": "acme"})
    config["tenants"][1]["features"].append({"slug": "triage", "owner": "x@globex.example"})

    assert apply_refused(tmp_path, config) == [
        "tenants[1].features[1]: feature 'triage' is declared twice (first at "
        "tenants[1].features[0])",
        "tenants[2]: tenant 'acme' is declared twice (first at tenants[0])",
    ]


def test_a_feature_in_a_scope_needs_its_tenant(tmp_path: Path) -> None:
    config = base_config()
    config["limits"].append(
        {"scope": {"feature": "chat"}, "metric": "tokens", "window": "day", "amount": 10}
    )

    assert apply_refused(tmp_path, config) == [
        "limits[1].scope.feature: name the tenant too: feature slugs are unique within a tenant"
    ]


def test_a_model_name_shared_by_providers_must_be_qualified(tmp_path: Path) -> None:
    config = base_config()
    config["providers"].append(
        {"slug": "azure", "models": [{"name": "gpt-4o", "input_per_mtok": 2, "output_per_mtok": 8}]}
    )
    limit = {"scope": {"model": "gpt-4o"}, "metric": "tokens", "window": "day", "amount": 10}
    config["limits"].append(limit)

    assert apply_refused(tmp_path, config) == [
        "limits[1].scope.model: model 'gpt-4o' exists at azure, openai: write provider/gpt-4o"
    ]

    limit["scope"]["model"] = "azure/gpt-4o"
    apply(tmp_path, config)
    assert Limit.objects.get(model__isnull=False).model.provider.slug == "azure"
    assert "scope: {model: azure/gpt-4o}" in quota("export")[0]


def test_a_refused_apply_exits_non_zero_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = base_config()
    config["limits"][0]["amount"] = -5
    path = write_config(tmp_path, config)

    with pytest.raises(SystemExit) as exited:
        execute_from_command_line(["manage.py", "quota", "apply", str(path)])

    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "limits[0].amount: The amount must be greater than zero.\n" in err
    assert "CommandError: 1 error in" in err
    assert "Traceback" not in err


def test_a_missing_file_is_a_plain_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match=r"cannot read .*nope.yaml: No such file"):
        quota("apply", str(tmp_path / "nope.yaml"))


# API keys.


@pytest.fixture
def demo() -> None:
    call_command("quota", "apply", str(DEMO), stdout=StringIO())


@pytest.mark.usefixtures("demo")
def test_key_create_prints_the_key_once_and_stores_only_its_hash() -> None:
    out, err = quota("key", "create", "--tenant", "acme", "--feature", "chat", "--name", "bot")

    secret = out.strip()
    key = ApiKey.objects.get()
    assert secret.startswith(f"qk_{key.prefix}_")
    assert key.hashed_secret == api_key_hash(secret, pepper=settings.QUOTA_API_KEY_PEPPER)
    assert secret not in str(list(ApiKey.objects.values()))
    assert secret not in err
    assert "shown only this once" in err
    assert [f.slug for f in key.features.all()] == ["chat"]
    assert key.name == "bot"
    listing = quota("key", "list", "--tenant", "acme")[0]
    assert secret.split("_", 2)[2] not in listing


@pytest.mark.usefixtures("demo")
def test_key_list_shows_prefix_name_features_and_revocation() -> None:
    first = quota("key", "create", "--tenant", "acme", "--name", "ci")[0].strip()
    quota("key", "create", "--tenant", "acme", "--feature", "chat", "--feature", "report-gen")
    quota("key", "create", "--tenant", "globex")
    quota("key", "revoke", first.split("_")[1])

    lines = quota("key", "list", "--tenant", "acme")[0].splitlines()

    assert lines[0].split() == [
        "PREFIX",
        "NAME",
        "FEATURES",
        "CREATED",
        "(UTC)",
        "REVOKED",
        "(UTC)",
    ]
    assert len(lines) == 3
    ci = next(line for line in lines if line.startswith(first.split("_")[1]))
    assert " ci " in ci and "(all)" in ci and not ci.rstrip().endswith("-")
    narrowed = next(line for line in lines[1:] if line != ci)
    assert "chat, report-gen" in narrowed and narrowed.rstrip().endswith("-")


@pytest.mark.usefixtures("demo")
def test_key_revoke_accepts_the_prefix_or_the_whole_key() -> None:
    secret = quota("key", "create", "--tenant", "acme")[0].strip()

    out = quota("key", "revoke", secret)[0]
    again = quota("key", "revoke", secret.split("_")[1])[0]

    assert ApiKey.objects.get().revoked_at is not None
    assert "revoked" in out and "was already revoked" in again


@pytest.mark.usefixtures("demo")
def test_key_commands_refuse_unknown_names() -> None:
    with pytest.raises(CommandError, match="no feature 'triage' in tenant 'acme'"):
        quota("key", "create", "--tenant", "acme", "--feature", "triage")
    with pytest.raises(CommandError, match="no tenant 'initech'"):
        quota("key", "list", "--tenant", "initech")
    with pytest.raises(CommandError, match="no API key with prefix 'abc'"):
        quota("key", "revoke", "abc")
    assert not ApiKey.objects.exists()


def test_apply_and_export_leave_a_running_boost_alone_even_when_the_amount_overtakes_it(
    tmp_path: Path,
) -> None:
    from datetime import timedelta
    from decimal import Decimal

    from django.utils import timezone

    from quotas.boosts import limit_boost

    apply(tmp_path, base_config())
    limit = Limit.objects.get(pool__slug="shared")
    now = timezone.now()
    limit_boost(limit=limit, amount=Decimal(1500), until=now + timedelta(hours=1), now=now)
    assert "boost" not in quota("export")[0]

    raised = base_config()
    raised["limits"][0]["amount"] = 2000
    apply(tmp_path, raised)

    limit.refresh_from_db()
    assert (limit.amount, limit.boost_amount) == (Decimal(2000), Decimal(1500))
    assert limit.amount_at(now) == Decimal(2000)  # the higher of the two while the boost runs
    assert limit.amount_at(now + timedelta(hours=2)) == Decimal(2000)


def test_a_pools_backpressure_is_applied_and_exported(tmp_path: Path) -> None:
    config = base_config()
    config["pools"][0]["backpressure"] = {"adaptive": True, "floor": 0.4, "breaker": False}
    apply(tmp_path, config)

    assert Pool.objects.get(slug="shared").backpressure == config["pools"][0]["backpressure"]
    exported = quota("export")[0]
    (pool,) = yaml.safe_load(exported)["pools"]
    assert pool["backpressure"] == {"adaptive": True, "floor": 0.4, "breaker": False}
    assert "0 created, 0 updated" in totals(apply(tmp_path, yaml.safe_load(exported)))


def test_a_wrong_backpressure_setting_is_an_error(tmp_path: Path) -> None:
    config = base_config()
    config["pools"][0]["backpressure"] = {"floor": 2, "adaptve": True}

    errors = apply_refused(tmp_path, config)

    assert errors[0] == "pools[0].backpressure: 'floor' must be between 0.01 and 1."
    assert errors[1].startswith("pools[0].backpressure: 'adaptve' is not a setting (adaptive, ")
    assert len(errors) == 2


def test_a_limits_burst_is_applied_and_exported(tmp_path: Path) -> None:
    config = base_config()
    config["limits"][0]["burst"] = 100
    apply(tmp_path, config)

    assert Limit.objects.get().burst == 100
    exported = yaml.safe_load(quota("export")[0])
    assert exported["limits"][0]["burst"] == 100
