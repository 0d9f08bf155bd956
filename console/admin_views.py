"""Mixins that put the console on the model admins: live panels on change pages, and the
one-click actions (pause or resume a feature, boost a limit, revoke an API key).

Every action is a POST behind the admin's login and CSRF protection, is allowed only when
the user may change that very row (so an owner acts only within their tenants: the scoped
`get_object` finds nothing else, and answers 404), and is audited twice: in the admin's log
(shown on the row's history page) and in the row's own history (who, when, what changed).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from console.fields import PlainDecimalField
from quotas.boosts import MAX_BOOST, limit_boost, limit_boost_end
from quotas.keys import api_key_revoke
from quotas.models import ApiKey, Limit
from quotas.validation import limit_describe
from tenants.models import Feature
from tenants.services import feature_status_set

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

    _AdminBase = ModelAdmin[Any]
else:
    _AdminBase = object


class ConsoleAdminMixin(_AdminBase):
    """Shared plumbing: an object the user may change, or 404 / 403."""

    def changeable(self, request: HttpRequest, object_id: str) -> Any:
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            raise Http404
        if not self.has_change_permission(request, obj):
            raise PermissionDenied
        return obj

    def confirmation(
        self,
        request: HttpRequest,
        obj: Any,
        *,
        title: str,
        consequence: str,
        confirm_label: str,
        fields: dict[str, str] | None = None,
    ) -> TemplateResponse:
        """The page that asks before an action that stops calls (pause, revoke): GET shows
        it, its form POSTs the action."""
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "original": obj,
            "consequence": consequence,
            "confirm_label": confirm_label,
            "fields": fields or {},
            "back": self.change_url(obj),
        }
        return TemplateResponse(request, "console/confirm.html", context)

    def confirm_selected(
        self, request: HttpRequest, queryset: Any, *, action: str, consequence: str, label: str
    ) -> TemplateResponse | None:
        """For a changelist action that stops calls: None once confirmed (the action goes
        on), else the page that lists the rows and asks (as Django's delete does)."""
        if request.POST.get("post") == "yes":
            return None
        opts = self.model._meta
        context = {
            **self.admin_site.each_context(request),
            "title": f"{label}?",
            "opts": opts,
            "original": opts.verbose_name_plural,
            "consequence": consequence,
            "confirm_label": label,
            "objects": list(queryset),
            "fields": {"action": action, "post": "yes"},
            "selected_name": ACTION_CHECKBOX_NAME,
            "back": reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"),
        }
        return TemplateResponse(request, "console/confirm.html", context)

    @staticmethod
    def give_reason(obj: Any, message: str) -> None:
        """The words the row's next history record carries (simple_history's change reason),
        the same as the admin log's."""
        obj._change_reason = message

    def change_url(self, obj: Any) -> str:
        opts = self.model._meta
        return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])

    def console_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        """What the console adds to a visible row's change page; mixins extend it."""
        return {}

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = dict(extra_context or {})
        obj = self.get_object(request, unquote(object_id))
        if obj is not None and self.has_view_permission(request, obj):
            context.update(self.console_context(request, obj))
        return super().change_view(request, object_id, form_url, context)

    def object_url(self, name: str, view: Callable[..., HttpResponse]) -> URLPattern:
        opts = self.model._meta
        wrapped = self.admin_site.admin_view(view)
        return path(
            f"<path:object_id>/{name}/",
            wrapped,
            name=f"{opts.app_label}_{opts.model_name}_{name}",
        )


class LivePanelMixin(ConsoleAdminMixin):
    """Adds `live_context(request, obj)` to a visible row's change page (on GET: a failed
    POST shows the form with its errors, without the panels)."""

    def live_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        raise NotImplementedError

    def console_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        context = super().console_context(request, obj)
        if request.method == "GET":
            context.update(self.live_context(request, obj))
        return context


# -- pause and resume a feature ----------------------------------------------------------------


class FeatureSwitchMixin(ConsoleAdminMixin):
    """The kill switch: pause or resume a feature from its page or its list."""

    actions = ("pause_features", "resume_features")

    def get_urls(self) -> list[Any]:
        return [self.object_url("status", self.status_view), *super().get_urls()]

    def console_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        context = super().console_context(request, obj)
        if self.has_change_permission(request, obj):
            context["status_url"] = reverse("admin:tenants_feature_status", args=[obj.pk])
        return context

    def status_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method == "GET":
            return self._confirm_pause(request, object_id)
        return require_POST(self._status)(request, object_id)

    def _confirm_pause(self, request: HttpRequest, object_id: str) -> HttpResponse:
        feature: Feature = self.changeable(request, object_id)
        return self.confirmation(
            request,
            feature,
            title=f"Pause {feature}?",
            consequence=f"Every reservation of {feature} is refused from the next one on "
            "(423 feature_paused), in every process, until someone resumes it. Reservations "
            "held now may still commit.",
            confirm_label="Yes, pause it",
            fields={"status": Feature.Status.PAUSED},
        )

    def _status(self, request: HttpRequest, object_id: str) -> HttpResponse:
        feature: Feature = self.changeable(request, object_id)
        status = request.POST.get("status", "")
        if status not in Feature.Status.values:
            messages.error(request, f"'{status}' is not a feature status (active or paused).")
        else:
            self._switch(request, feature, status)
        return HttpResponseRedirect(self.change_url(feature))

    def _switch(self, request: HttpRequest, feature: Feature, status: str) -> None:
        verb = "Paused" if status == Feature.Status.PAUSED else "Resumed"
        self.give_reason(feature, f"{verb} the feature.")
        if not feature_status_set(feature=feature, status=status):
            messages.info(request, f"{feature} is already {status}.")
            return
        self.log_change(request, feature, f"{verb} the feature.")
        effect = (
            "its next reservation is refused with feature_paused"
            if status == Feature.Status.PAUSED
            else "it may reserve again"
        )
        messages.success(request, f"{verb} {feature}: {effect}.")

    def _switch_many(self, request: HttpRequest, queryset: Any, status: str) -> None:
        for feature in queryset.select_related("tenant"):
            if self.has_change_permission(request, feature):
                self._switch(request, feature, status)

    def pause_features(self, request: HttpRequest, queryset: Any) -> HttpResponse | None:
        asked = self.confirm_selected(
            request,
            queryset,
            action="pause_features",
            consequence="Every reservation of these features is refused from the next one on "
            "(423 feature_paused), until someone resumes them:",
            label="Yes, pause them",
        )
        if asked is None:
            self._switch_many(request, queryset, Feature.Status.PAUSED)
        return asked

    def resume_features(self, request: HttpRequest, queryset: Any) -> None:
        self._switch_many(request, queryset, Feature.Status.ACTIVE)

    pause_features.short_description = "Pause the selected features"  # type: ignore[attr-defined]
    pause_features.allowed_permissions = ("change",)  # type: ignore[attr-defined]
    resume_features.short_description = "Resume the selected features"  # type: ignore[attr-defined]
    resume_features.allowed_permissions = ("change",)  # type: ignore[attr-defined]


# -- boost a limit ---------------------------------------------------------------------------

BOOST_HOURS = (1, 4, 8, 24, 72, 168)


class BoostForm(forms.Form):
    amount = PlainDecimalField(
        max_digits=20, decimal_places=6, help_text="The cap while the boost lasts."
    )
    hours = forms.TypedChoiceField(
        label="for",
        coerce=int,
        choices=[(h, f"{h} hours" if h < 24 else f"{h // 24} days") for h in BOOST_HOURS],
        initial=4,
    )


class LimitBoostMixin(ConsoleAdminMixin):
    """A temporary boost: a higher cap for a few hours, then the amount again."""

    def get_urls(self) -> list[Any]:
        return [self.object_url("boost", self.boost_view), *super().get_urls()]

    def boost_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        limit: Limit = self.changeable(request, object_id)
        now = timezone.now()
        form = BoostForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and "end" in request.POST:
            self.give_reason(limit, "Ended the boost.")
            if limit_boost_end(limit=limit):
                self.log_change(request, limit, "Ended the boost.")
                messages.success(request, f"The boost of {limit_describe(limit)} ended.")
            return HttpResponseRedirect(self._back(request, limit))
        if request.method == "POST" and form.is_valid():
            until = now + timedelta(hours=form.cleaned_data["hours"])
            words = f"Boosted to {form.cleaned_data['amount']} until {until:%Y-%m-%d %H:%M %Z}."
            self.give_reason(limit, words)
            try:
                limit_boost(limit=limit, amount=form.cleaned_data["amount"], until=until, now=now)
            except ValidationError as exc:
                for message in exc.messages:
                    form.add_error(None, message)
            else:
                self.log_change(request, limit, words)
                messages.success(
                    request,
                    f"{limit_describe(limit)} is boosted to {limit.boost_amount} until "
                    f"{timezone.localtime(until):%Y-%m-%d %H:%M %Z}.",
                )
                return HttpResponseRedirect(self._back(request, limit))
        context = {
            **self.admin_site.each_context(request),
            "title": f"Boost {limit_describe(limit)}",
            "opts": self.model._meta,
            "original": limit,
            "form": form,
            "active": limit.boost_active(now),
            "max_days": MAX_BOOST.days,
            "back": self._back(request, limit),
        }
        return TemplateResponse(request, "console/boost.html", context)

    def _back(self, request: HttpRequest, limit: Limit) -> str:
        """The feature's page for a feature's limit (where the boost link was), else the
        limit's own page."""
        if limit.feature_id is not None:
            return reverse("admin:tenants_feature_change", args=[limit.feature_id])
        return self.change_url(limit)


# -- revoke an API key -----------------------------------------------------------------------


class ApiKeyRevokeMixin(ConsoleAdminMixin):
    """Revoke one key from its page (the changelist action revokes several)."""

    def get_urls(self) -> list[Any]:
        return [self.object_url("revoke", self.revoke_view), *super().get_urls()]

    def console_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        context = super().console_context(request, obj)
        if obj.revoked_at is None and self.has_change_permission(request, obj):
            context["revoke_url"] = reverse("admin:quotas_apikey_revoke", args=[obj.pk])
        return context

    def revoke_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method == "GET":
            api_key: ApiKey = self.changeable(request, object_id)
            return self.confirmation(
                request,
                api_key,
                title=f"Revoke {api_key}?",
                consequence=f"Every request made with {api_key} (prefix {api_key.prefix}) is "
                "refused from the next one on. A revoked key cannot be restored: its callers "
                "need a new key.",
                confirm_label="Yes, revoke it",
            )
        return require_POST(self._revoke)(request, object_id)

    def _revoke(self, request: HttpRequest, object_id: str) -> HttpResponse:
        api_key: ApiKey = self.changeable(request, object_id)
        if api_key.revoked_at is not None:
            messages.info(request, f"{api_key} was already revoked.")
        else:
            self.give_reason(api_key, "Revoked the key.")
            api_key_revoke(api_key=api_key)
            self.log_change(request, api_key, "Revoked the key.")
            messages.success(request, f"Revoked {api_key}: it is refused from now on.")
        return HttpResponseRedirect(self.change_url(api_key))
