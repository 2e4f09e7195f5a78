"""Sign-in limits on the real server: several web processes (as behind a load balancer) share
the counts in Redis, and simultaneous guesses cannot all pass the check."""

from __future__ import annotations

import re
import sys
import threading
import time

import pytest
import requests

from tests.support.stack import PASSWORD, running_stack
from webapp.jobs.management.commands.serve import free_port, web_command

pytestmark = pytest.mark.slow

WEB_PROCESSES = 4


@pytest.fixture(scope="module")
def web_urls(tmp_path_factory, private_redis):
    with running_stack(tmp_path_factory.mktemp("limits"), private_redis.url, workers=()) as stack:
        urls = [stack.base_url]
        for n in range(1, WEB_PROCESSES):
            port = free_port()
            stack.processes[f"web-{n}"] = stack._spawn(f"web-{n}", web_command(sys.executable, "127.0.0.1", port))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_until_up(url)
        stack.create_user("alice")
        stack.create_user("carol")
        yield urls


def wait_until_up(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(f"{url}/login/", timeout=2)
            return
        except requests.ConnectionError:
            assert time.monotonic() < deadline, f"{url} did not start"
            time.sleep(0.3)


def login_form(url: str, password: str, username: str = "alice") -> tuple[requests.Session, dict[str, str]]:
    """A client at the login form of one web process, and what it will post."""
    http = requests.Session()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', http.get(f"{url}/login/").text).group(1)
    return http, {"username": username, "password": password, "csrfmiddlewaretoken": token}


def post(url: str, http: requests.Session, form: dict[str, str]) -> int:
    return http.post(f"{url}/login/", data=form, allow_redirects=False).status_code


def test_twenty_simultaneous_wrong_passwords_get_at_most_five_checks(web_urls):
    urls = [web_urls[n % WEB_PROCESSES] for n in range(20)]
    guesses = [(url, *login_form(url, f"guess-{n}")) for n, url in enumerate(urls)]
    barrier = threading.Barrier(len(guesses))
    answers = []

    def guess(url, http, form):
        barrier.wait()
        answers.append(post(url, http, form))

    threads = [threading.Thread(target=guess, args=args) for args in guesses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(answers) <= {200, 429}, answers
    assert answers.count(200) <= 5, f"{answers.count(200)} passwords were checked"  # 200: the form came back
    assert post(web_urls[0], *login_form(web_urls[0], PASSWORD)) == 429  # locked for the window


def test_a_client_cannot_pick_its_address_with_a_forwarded_header(web_urls):
    url = web_urls[0]
    for n in range(5):
        http, form = login_form(url, f"guess-{n}", username="carol")
        http.headers["X-Forwarded-For"] = f"203.0.113.{n}"
        assert post(url, http, form) == 200
    http, form = login_form(url, PASSWORD, username="carol")
    http.headers["X-Forwarded-For"] = "203.0.113.99"
    assert post(url, http, form) == 429, "the header moved the client out of its own count"
