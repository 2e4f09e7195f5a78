"""The official `openai` client against the real server (uvicorn, database, Redis): it lists and
retrieves models with a key made by `manage.py apikey`, and raises the errors it raises against
OpenAI for a bad key and for another user's model."""

import openai
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(stack):
    for name in ("api-owner", "api-other"):
        stack.create_user(name)
    return {name: stack.manage("apikey", name).strip() for name in ("api-owner", "api-other")}


def client(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=30)


def test_the_client_lists_the_bases_and_the_users_own_fine_tunes(stack, keys):
    mine = stack.create_job("api-owner", state="succeeded")
    theirs = stack.create_job("api-other", state="succeeded")
    names = [model.id for model in client(stack, keys["api-owner"]).models.list()]
    assert "smollm2-135m-instruct" in names and "all-minilm-l6-v2" in names
    assert f"ft:x:api-owner:{mine}" in names and not [n for n in names if n.endswith(f":{theirs}")]
    model = client(stack, keys["api-owner"]).models.retrieve(f"ft:x:api-owner:{mine}")
    assert model.owned_by == "api-owner" and model.object == "model"


def test_another_users_model_is_not_found_for_the_client(stack, keys):
    theirs = stack.create_job("api-other", state="succeeded")
    with pytest.raises(openai.NotFoundError, match="does not exist or you do not have access"):
        client(stack, keys["api-owner"]).models.retrieve(f"ft:x:api-other:{theirs}")


def test_a_wrong_key_is_an_authentication_error(stack, keys):
    with pytest.raises(openai.AuthenticationError):
        client(stack, "sk-spec-" + "x" * 43).models.list()
