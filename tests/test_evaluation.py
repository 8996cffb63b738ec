"""The paper's measures (`diffusers_delta.evaluation`), checked by their defining properties on tiny real CLIP and
SigLIP models built from configs, and the judge against a local OpenAI-compatible endpoint."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    SiglipImageProcessorPil,
)

from diffusers_delta.evaluation import (
    JUDGE_PROMPTS,
    ImageEmbedder,
    JudgeError,
    LPIPSMetric,
    MetricUnavailable,
    VLMJudge,
    clip_image_similarity,
    directional_similarity,
    parse_judge_score,
)
from diffusers_delta.testing import random_image, tiny_image_encoder


def tiny_clip() -> ImageEmbedder:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return ImageEmbedder(CLIPVisionModelWithProjection(config), processor)


def tiny_siglip() -> ImageEmbedder:
    return ImageEmbedder(tiny_image_encoder(), SiglipImageProcessorPil(size={"height": 32, "width": 32}))


SOURCE, TARGET, QUERY, OTHER = (random_image(seed) for seed in range(4))


@pytest.mark.parametrize("embedder", [tiny_clip(), tiny_siglip()], ids=["clip", "siglip"])
def test_clip_i_is_one_for_an_image_and_itself_and_less_for_another(embedder):
    same = clip_image_similarity(embedder, [QUERY, SOURCE], [QUERY, SOURCE])
    torch.testing.assert_close(same, torch.ones(2))
    assert clip_image_similarity(embedder, [QUERY], [OTHER])[0] < 1 - 1e-4


@pytest.mark.parametrize("embedder", [tiny_clip(), tiny_siglip()], ids=["clip", "siglip"])
def test_directional_similarity_of_the_same_the_reverse_and_no_change(embedder):
    # The query is the exemplar's source edited into its target: the same change; the reverse; nothing at all.
    same = directional_similarity(embedder, [SOURCE], [TARGET], [SOURCE], [TARGET])
    reverse = directional_similarity(embedder, [TARGET], [SOURCE], [SOURCE], [TARGET])
    none = directional_similarity(embedder, [QUERY], [QUERY], [SOURCE], [TARGET])
    torch.testing.assert_close(torch.cat([same, reverse, none]), torch.tensor([1.0, -1.0, 0.0]))
    # A change that shares the exemplar's direction beside an unrelated one: in between.
    partial = directional_similarity(embedder, [QUERY], [OTHER], [SOURCE], [TARGET])
    assert -1 < partial[0] < 1


def test_lpips_runs_or_says_in_one_line_why_not():
    try:
        metric = LPIPSMetric()
    except MetricUnavailable as error:
        message = str(error)
        assert "\n" not in message and message.startswith("LPIPS is unavailable") and "pip install lpips" in message
        return
    distances = metric([QUERY, QUERY], [QUERY, OTHER])  # lpips and its weights are here: the defining properties
    assert distances[0] == pytest.approx(0.0, abs=1e-6) and distances[1] > 0


class _Endpoint(BaseHTTPRequestHandler):
    """A local OpenAI-compatible chat endpoint that records the requests and answers with a fixed score."""

    requests: list = []
    answer = "4. The edit matches, with a small colour difference."

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers.get("Authorization"), body))
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": type(self).answer}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    _Endpoint.requests = []
    server = HTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_the_judge_asks_both_questions_with_the_four_images_and_reads_the_scores(endpoint):
    judge = VLMJudge(endpoint, model="judge-model", api_key="secret")
    scores = judge.score(SOURCE, TARGET, QUERY, OTHER)
    assert (scores.content_consistency, scores.edit_accuracy) == (4, 4)
    prompts = json.loads(JUDGE_PROMPTS.read_text())
    assert len(_Endpoint.requests) == 2
    for (path, authorization, body), question in zip(_Endpoint.requests, ("content_consistency", "edit_accuracy")):
        assert path == "/v1/chat/completions" and authorization == "Bearer secret" and body["model"] == "judge-model"
        system, user = body["messages"]
        assert system["content"] == prompts["system"] and user["content"][0]["text"] == prompts[question]
        images = [part["image_url"]["url"] for part in user["content"][1:]]
        assert len(images) == 4 and all(url.startswith("data:image/png;base64,") for url in images)

    _Endpoint.answer = "Score: 0 (out of 5)"  # outside the scale: unparsable, never read as 5
    unclear = judge.score(SOURCE, TARGET, QUERY, OTHER)
    assert unclear.content_consistency is None and unclear.unparsable() == ["content_consistency", "edit_accuracy"]
    assert unclear.answers["edit_accuracy"] == "Score: 0 (out of 5)"
    _Endpoint.answer = "4. The edit matches, with a small colour difference."


#: Replies judges give, and the score each states (None: none clearly, recorded as unparsable).
JUDGE_REPLIES = {
    "4. The edit matches, with a small colour difference.": 4,
    "5": 5,
    "**5**\nEverything that should stay is unchanged.": 5,
    "4/5": 4,
    "Score: 4": 4,
    "**Score:** 3": 3,
    "Score: 4/5 - the frame is thinner than the exemplar's.": 4,
    "Rating: 2 out of 5. The edit is barely visible.": 2,
    "I'd rate this 3/5 because the hue differs.": 3,
    "Content consistency: 5/5": 5,
    "0/5": None,
    "Score: 0 (out of 5)": None,
    "0. The query is lost.": None,
    "Score: 6/5": None,
    "10/10": None,
    "Score: 3.5": None,
    "3/5 or 4/5, depending on how the border counts.": None,
    "4. Though I would say 3/5 at most.": None,
    "I cannot tell.": None,
    "The edit is good.": None,
}


@pytest.mark.parametrize("reply", list(JUDGE_REPLIES))
def test_judge_scores_are_read_strictly(reply):
    assert parse_judge_score(reply) == JUDGE_REPLIES[reply]


class _Broken(BaseHTTPRequestHandler):
    """An endpoint that answers every request with `status` and `body`."""

    status, body = 200, b""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (200, b"<html><body>Welcome to nginx!</body></html>", "something other than a chat completion: '<html>"),
        (200, b'{"error": "model not found"}', "something other than a chat completion: '{\"error\""),
        (500, b"Internal Server Error", "HTTP 500 Internal Server Error: 'Internal Server Error'"),
    ],
)
def test_a_judge_endpoint_answering_something_else_is_named_in_one_line(status, body, expected):
    _Broken.status, _Broken.body = status, body
    server = HTTPServer(("127.0.0.1", 0), _Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = VLMJudge(f"http://127.0.0.1:{server.server_port}/v1", model="m", timeout=5)
        with pytest.raises(JudgeError) as caught:
            judge.score(SOURCE, TARGET, QUERY, OTHER)
        message = str(caught.value)
        assert expected in message and "\n" not in message and len(message) < 400
    finally:
        server.shutdown()
        server.server_close()
