"""All configuration, read from the environment, with defaults that make a fresh checkout run.

Production mode (SPECIALIST_PRODUCTION=1) turns DEBUG off, requires SECRET_KEY (long and random:
placeholders and weak keys are refused) and ALLOWED_HOSTS from the environment and turns on
secure cookies and HSTS.
"""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
# Where a single-machine install keeps its state: the SQLite database, uploads, artifacts.
VAR_DIR = Path(os.environ.get("SPECIALIST_VAR_DIR", BASE_DIR / "var"))


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def envbool(name: str, default: bool = False) -> bool:
    """A yes/no setting; anything else stops the server at start-up (a typo must not mean "off")."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().lower() not in TRUE + FALSE:
        raise ImproperlyConfigured(f"{name}={value!r}: use one of {', '.join(TRUE)} or {', '.join(FALSE[:-1])}")
    return value.strip().lower() in TRUE


def envint(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def envlist(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


PRODUCTION = envbool("SPECIALIST_PRODUCTION")
DEV_SECRET_KEY = "dev-only-insecure-key-set-SECRET_KEY-in-production"
# Keys published in docs and examples (ours included), compared in lower case.
PLACEHOLDER_SECRET_KEYS = {
    DEV_SECRET_KEY.lower(), "change-me-to-a-long-random-value", "changeme", "change-me", "change_me", "secret",
    "secret-key", "secret_key", "secretkey", "your-secret-key", "your_secret_key", "mysecretkey", "django-insecure",
}


def secret_key_problem(key: str) -> str | None:
    """Why `key` cannot sign a production server's sessions and checkpoints; None if it can.

    A published key is known to anyone who has read it. The length and variety rules are
    Django's own (`check --deploy`, security.W009), here an error instead of a warning.
    """
    if not key:
        return "is not set"
    if key.strip().lower() in PLACEHOLDER_SECRET_KEYS or key.startswith("django-insecure-"):
        return "is a published placeholder"
    if len(key) < 50:
        return f"has {len(key)} characters (50 at least)"
    if len(set(key)) < 5:
        return "has fewer than 5 different characters"
    return None


SECRET_KEY = os.environ.get("SECRET_KEY", DEV_SECRET_KEY)
if PRODUCTION and (problem := secret_key_problem(os.environ.get("SECRET_KEY", ""))):
    raise ImproperlyConfigured(
        f"SPECIALIST_PRODUCTION is on and SECRET_KEY {problem}: set SECRET_KEY to a long random value, e.g. "
        "the output of  python -c 'import secrets; print(secrets.token_urlsafe(50))'  (and keep it: it signs "
        "sessions and checkpoints)"
    )
DEBUG = envbool("DEBUG", not PRODUCTION)
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "" if PRODUCTION else "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "webapp.accounts",
    "webapp.datasets",
    "webapp.jobs",
    "webapp.api",
    "webapp.webhooks",
    "webapp.exports",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "webapp.accounts.middleware.FirstRunMiddleware",
]

ROOT_URLCONF = "webapp.urls"
ASGI_APPLICATION = "webapp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'specialist.sqlite3'}", conn_max_age=60
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Web and worker processes share the file: wait for locks instead of failing at once.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30, "init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE",
    }
    VAR_DIR.mkdir(parents=True, exist_ok=True)
elif DATABASES["default"]["ENGINE"].endswith("postgresql"):
    # One pool per process instead of one connection per thread: under ASGI every request runs in
    # a thread of its own, and a burst of requests (200 pages opening a job's live stream at once)
    # would otherwise open more connections than PostgreSQL allows (100) and fail; with a pool
    # they wait their turn. The pool keeps the connections, so none is kept per request.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1, "max_size": envint("SPECIALIST_DB_POOL_SIZE", 16), "timeout": 60,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
WHITENOISE_USE_FINDERS = True

MEDIA_ROOT = Path(os.environ.get("SPECIALIST_MEDIA_ROOT", VAR_DIR / "media"))
# Folders an operator allows as base models (comma-separated): each a model folder, or a folder of
# them. Users may also name catalog models, Hub ids in the server's cache and their own trained
# models (by job); never a path into MEDIA_ROOT, whatever is listed here.
MODEL_DIRS = [Path(p).expanduser() for p in envlist("SPECIALIST_MODEL_DIRS")]
MAX_UPLOAD_BYTES = envint("SPECIALIST_MAX_UPLOAD_BYTES", 1024**3)
# Uploads stream to a temporary file past this size; never held in memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
# Uploads up to this size are read in the request; larger ones by a worker on the "cpu" queue.
# A Parquet file counts by its uncompressed size (from its footer), which can be far larger.
INLINE_PARSE_BYTES = envint("SPECIALIST_INLINE_PARSE_BYTES", 5 * 1024 * 1024)
# The most text one compressed (Parquet) upload may unpack to; more is refused with the row.
MAX_DECODED_BYTES = envint("SPECIALIST_MAX_DECODED_BYTES", 4 * MAX_UPLOAD_BYTES)
# Quality reports one user may have computing (or waiting for the queue) at once; a further
# choice on the dataset page waits, with a message, until one is done.
QUALITY_REPORTS_PER_USER = envint("SPECIALIST_QUALITY_REPORTS_PER_USER", 3)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# Sign-in limits (webapp/accounts/ratelimit.py), counted in Redis per client address over a
# window that starts at the first attempt: a name that failed this many times at an address is
# refused there, even with the right password, until the window ends...
LOGIN_FAILURES_PER_ACCOUNT = envint("SPECIALIST_LOGIN_FAILURES_PER_ACCOUNT", 5)
# ...and past this many failures from an address (on any names), a name that already failed
# there is refused; a name with no failures of its own still gets its one check.
LOGIN_FAILURES_PER_ADDRESS = envint("SPECIALIST_LOGIN_FAILURES_PER_ADDRESS", 30)
LOGIN_FAILURE_WINDOW_SECONDS = envint("SPECIALIST_LOGIN_FAILURE_WINDOW_SECONDS", 15 * 60)
# Requests one API key (or one signed-in user's playground) may make per minute; over it: 429.
API_REQUESTS_PER_MINUTE = envint("SPECIALIST_API_REQUESTS_PER_MINUTE", 600)
# The client's address is REMOTE_ADDR unless this names a header set by a reverse proxy (e.g.
# X-Forwarded-For); then it is the entry SPECIALIST_TRUSTED_PROXIES from the right, the one the
# outermost trusted proxy appended. Set it only when clients cannot reach the app directly.
CLIENT_IP_HEADER = os.environ.get("SPECIALIST_CLIENT_IP_HEADER", "").strip()
TRUSTED_PROXIES = envint("SPECIALIST_TRUSTED_PROXIES", 1)
if TRUSTED_PROXIES < 1:
    raise ImproperlyConfigured("SPECIALIST_TRUSTED_PROXIES counts the proxies in front of the app: 1 or more")

CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_ROUTES = {
    "webapp.jobs.train_job": {"queue": "train"}, "webapp.jobs.*": {"queue": "cpu"}, "webapp.datasets.*": {"queue": "cpu"},
    "webapp.webhooks.*": {"queue": "cpu"}, "webapp.exports.*": {"queue": "cpu"},
}
CELERY_TASK_DEFAULT_QUEUE = "cpu"
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": envint("CELERY_VISIBILITY_TIMEOUT", 3600)}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = False

# Where jobs write checkpoints and artifacts; shared with the workers.
JOBS_ROOT = MEDIA_ROOT / "jobs"
# How often a worker renews its lease and notices a cancel.
JOB_HEARTBEAT_SECONDS = envint("SPECIALIST_HEARTBEAT_SECONDS", 2)
# A running job whose heartbeat is older than this is requeued by the reaper...
JOB_LEASE_SECONDS = envint("SPECIALIST_LEASE_SECONDS", 60)
# ...at most this many attempts in all, then it fails with the reason.
JOB_MAX_ATTEMPTS = envint("SPECIALIST_MAX_ATTEMPTS", 3)
# A worker that could not renew its lease for this long stops the job by itself (Airflow's rule:
# a task that cannot heartbeat terminates), before the reaper can give it to another worker.
JOB_LEASE_GRACE_SECONDS = envint("SPECIALIST_LEASE_GRACE_SECONDS", JOB_LEASE_SECONDS // 2)
if not 0 < JOB_LEASE_GRACE_SECONDS < JOB_LEASE_SECONDS:
    raise ImproperlyConfigured("SPECIALIST_LEASE_GRACE_SECONDS must be above 0 and below SPECIALIST_LEASE_SECONDS")
# One attempt at a job runs at most this long, then fails with a message saying so.
JOB_MAX_SECONDS = envint("SPECIALIST_MAX_JOB_SECONDS", 24 * 3600)
# Jobs one user may have queued or running at once.
MAX_ACTIVE_JOBS_PER_USER = envint("SPECIALIST_MAX_ACTIVE_JOBS_PER_USER", 20)
# A queued job whose id never reached the broker (it was down) is sent at the reaper's next run;
# one still unclaimed this long after it was sent is sent again (the broker may have lost it).
JOB_RESEND_SECONDS = envint("SPECIALIST_RESEND_SECONDS", 600)
REAPER_SECONDS = float(envint("SPECIALIST_REAPER_SECONDS", 20))
# The periodic tasks, run by the scheduler inside the CPU worker: the reaper (and its clean-up of
# ended jobs' files), and the resends of work whose message the broker never took or lost.
CELERY_BEAT_SCHEDULE = {
    name: {"task": task, "schedule": REAPER_SECONDS, "options": {"queue": "cpu", "expires": 60}}
    for name, task in (
        ("reap-stale-jobs", "webapp.jobs.reap_stale_jobs"),
        ("resend-queued-jobs", "webapp.jobs.resend_queued_jobs"),
        ("resend-waiting-datasets", "webapp.datasets.resend_waiting_datasets"),
        ("resend-quality-reports", "webapp.datasets.resend_quality_reports"),
        ("send-due-webhooks", "webapp.webhooks.send_due_deliveries"),
    )
}
# Webhooks: the seconds between one try at a delivery and the next (the last repeats), until this
# long after the event; each try waits this long for a connection and for each read of the answer.
WEBHOOK_RETRY_SECONDS = [float(s) for s in envlist("SPECIALIST_WEBHOOK_RETRY_SECONDS", "60,300,1800,7200,18000,36000")]
WEBHOOK_GIVE_UP_SECONDS = float(envint("SPECIALIST_WEBHOOK_GIVE_UP_SECONDS", 24 * 3600))
WEBHOOK_TIMEOUT_SECONDS = float(os.environ.get("SPECIALIST_WEBHOOK_TIMEOUT_SECONDS", 10))
if not WEBHOOK_RETRY_SECONDS:
    raise ImproperlyConfigured("SPECIALIST_WEBHOOK_RETRY_SECONDS needs at least one delay")
# Live event streams (job pages) one user may hold open at once in a web process; past it, 429.
MAX_STREAMS_PER_USER = envint("SPECIALIST_MAX_STREAMS_PER_USER", 20)

SESSION_COOKIE_SECURE = PRODUCTION
CSRF_COOKIE_SECURE = PRODUCTION
SECURE_SSL_REDIRECT = PRODUCTION and envbool("SECURE_SSL_REDIRECT", True)
SECURE_HSTS_SECONDS = 31536000 if PRODUCTION else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = PRODUCTION
SECURE_HSTS_PRELOAD = PRODUCTION
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if PRODUCTION else None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
FILE_UPLOAD_HANDLERS = [
    "webapp.datasets.uploads.SizeLimitHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]
