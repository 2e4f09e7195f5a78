"""`manage.py apikey USERNAME [--name NAME]`: print a new API key for that user (for scripts and
operators; the key is shown this once, like on the account page)."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from webapp.accounts.models import ApiKey


class Command(BaseCommand):
    help = "Print a new API key for USERNAME (shown once; revoke it on the account page)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="command line", help="What the key is for, as the account page lists it.")

    def handle(self, *args, username: str, name: str, **options):
        owner = get_user_model().objects.filter(username=username, is_active=True).first()
        if owner is None:
            raise CommandError(f"No active user named {username!r}.")
        _, secret = ApiKey.issue(owner, name)
        self.stdout.write(secret)
