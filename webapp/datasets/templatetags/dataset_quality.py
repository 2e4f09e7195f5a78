from django import template

from webapp.datasets import reports

register = template.Library()


@register.simple_tag
def quality_choices(dataset) -> dict:
    """The base models a report can be computed for, and the defaults (the new-job form's)."""
    base_model, max_length = reports.defaults(dataset.task)
    return {"models": reports.base_model_choices(dataset.task), "base_model": base_model, "max_length": max_length}
