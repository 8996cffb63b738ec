"""The paper's measures of an exemplar-based edit (Delta-Adapter, section 5.1), from maintained models.

- **LPIPS** between the query and its edit (content preservation: lower keeps more), from the `lpips` package with its
  published AlexNet weights. Where it cannot load (it needs torchvision and downloads its weights), `LPIPSMetric`
  raises `MetricUnavailable` with one line saying why, and the other measures run.
- **CLIP-I** between the query and its edit (semantic similarity: the cosine of their image embeddings).
- **Directional similarity**, an automatic measure of edit accuracy: the cosine between the query→edit and the
  exemplar's source→target changes in the same embedding space (1: the same change, 0: unrelated or none, −1: the
  reverse). Embeddings come from any CLIP or SigLIP vision model of transformers (`ImageEmbedder`).
- The paper's two 5-point judgements (content consistency, edit accuracy), from a vision-language model behind any
  OpenAI-compatible endpoint (`VLMJudge`), with the prompts in a file the user reads and may change.
- **Mean absolute error** to a known true edit (`mean_absolute_error`), where one is known (the toy world).
"""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .image_inputs import ImageInput, to_rgb_image


#: The judge's default prompts (a JSON file of {"system", "content_consistency", "edit_accuracy"}).
JUDGE_PROMPTS = Path(__file__).with_name("judge_prompts.json")


def mean_absolute_error(image: ImageInput, truth: ImageInput) -> float:
    """The mean absolute difference of two images of one size, per pixel and channel, in [0, 1] (0: identical).

    Args:
        image: an edited image (or the unedited query, for the identity baseline).
        truth: the true edit.
    """
    return float(np.abs(np.asarray(image, np.float64) - np.asarray(truth, np.float64)).mean() / 255)


class MetricUnavailable(RuntimeError):
    """A measure that cannot run here; its message is one line that says why and what would make it run."""


class ImageEmbedder:
    """Unit-norm image embeddings from a transformers vision model: a CLIP (`CLIPModel`,
    `CLIPVisionModelWithProjection`) or a SigLIP (`SiglipModel`, `SiglipVisionModel`), with its image processor.

    Args:
        model: the vision model (its projected embedding is used where it has one, else its pooled output).
        processor: the image processor that goes with it.
    """

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "ImageEmbedder":
        """A Hub id or folder of a CLIP or SigLIP model (e.g. `openai/clip-vit-large-patch14`)."""
        from transformers import AutoImageProcessor, AutoModel

        return cls(AutoModel.from_pretrained(name_or_path, **kwargs), AutoImageProcessor.from_pretrained(name_or_path))

    @torch.no_grad()
    def __call__(self, images: list[ImageInput]) -> torch.Tensor:
        """Images -> (B, D) float32 unit vectors."""
        rgb = [to_rgb_image(image, name="image", min_side=1) for image in images]
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.model.device, self.model.dtype)
        if hasattr(self.model, "get_image_features"):
            output = self.model.get_image_features(pixel_values=pixels)
        else:
            output = self.model(pixel_values=pixels)
        if not isinstance(output, torch.Tensor):
            output = output.image_embeds if getattr(output, "image_embeds", None) is not None else output.pooler_output
        return F.normalize(output.float(), dim=-1)


def clip_image_similarity(embedder: ImageEmbedder, queries: list[ImageInput], edits: list[ImageInput]) -> torch.Tensor:
    """CLIP-I: the cosine between each query's and its edit's embeddings -> (B,) in [−1, 1] (1: the same image)."""
    return (embedder(queries) * embedder(edits)).sum(dim=-1)


def directional_similarity(
    embedder: ImageEmbedder,
    queries: list[ImageInput],
    edits: list[ImageInput],
    sources: list[ImageInput],
    targets: list[ImageInput],
) -> torch.Tensor:
    """The cosine between each query→edit change and its exemplar's source→target change -> (B,) in [−1, 1];
    0 where either change is none (an edit that left the query as it was has no direction)."""
    edit_change = embedder(edits) - embedder(queries)  # (B, D)
    exemplar_change = embedder(targets) - embedder(sources)  # (B, D)
    return F.cosine_similarity(edit_change, exemplar_change, dim=-1, eps=1e-8)


class LPIPSMetric:
    """LPIPS distance (AlexNet, as the paper's tables use it) between each query and its edit: 0 for the same image.

    Args:
        net: the `lpips` package's backbone (`"alex"`, `"vgg"`, `"squeeze"`).
        device: where to run it.

    Raises:
        MetricUnavailable: the `lpips` package, torchvision or the published weights cannot load here.
    """

    def __init__(self, net: str = "alex", device: torch.device | str = "cpu"):
        try:
            import lpips
        except Exception as error:  # ImportError, or torchvision failing to import beside this torch
            raise MetricUnavailable(
                f"LPIPS is unavailable: the lpips package does not import here ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no message'}); pip install lpips (it needs a "
                "torchvision matching torch) to add it."
            ) from None
        try:
            self.model = lpips.LPIPS(net=net, verbose=False).eval().to(device)
        except Exception as error:  # the backbone's weights are downloaded on first use
            raise MetricUnavailable(
                f"LPIPS is unavailable: its {net} weights could not be loaded ({type(error).__name__}); run it once "
                "with internet access to download them."
            ) from None
        self.device = device

    @torch.no_grad()
    def __call__(self, queries: list[ImageInput], edits: list[ImageInput]) -> torch.Tensor:
        """-> (B,) distances (images resized to the query's size)."""
        distances = []
        for query, edit in zip(queries, edits):
            query = to_rgb_image(query, name="query", min_side=1)
            edit = to_rgb_image(edit, name="edit", min_side=1).resize(query.size, PIL.Image.BICUBIC)
            pair = [_to_signed_tensor(image).to(self.device) for image in (query, edit)]
            distances.append(self.model(*pair).flatten()[0].float().cpu())
        return torch.stack(distances)


def _to_signed_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [−1, 1], as LPIPS takes images."""
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return array.permute(2, 0, 1)[None].float() / 127.5 - 1.0


@dataclass
class JudgeScores:
    """A vision-language model's two 5-point scores of one edit (None where its answer held no clear score: see
    `parse_judge_score`), and its answers as given."""

    content_consistency: int | None
    edit_accuracy: int | None
    answers: dict[str, str]

    def unparsable(self) -> list[str]:
        """The questions whose answer held no clear score."""
        scores = {"content_consistency": self.content_consistency, "edit_accuracy": self.edit_accuracy}
        return [name for name, score in scores.items() if score is None]


class JudgeError(RuntimeError):
    """The judge endpoint failed or answered something other than a chat completion; one line that says which."""


class VLMJudge:
    """The paper's GPT-based measures through any OpenAI-compatible chat-completions endpoint: content consistency
    (are the regions the edit should not touch unchanged?) and edit accuracy (is the query changed the way the
    exemplar changes its source?), each an integer from 1 to 5.

    Args:
        base_url: the endpoint's base URL (e.g. `https://api.openai.com/v1`, or a local vLLM server's).
        model: the model name the endpoint serves.
        api_key: sent as a bearer token, when the endpoint needs one.
        prompts: a JSON file with `system`, `content_consistency` and `edit_accuracy` prompts (`JUDGE_PROMPTS` by
            default: read it to see what the judge is asked).
        timeout: seconds to wait for each answer.

    Raises (from `score`):
        JudgeError: the endpoint could not be reached, answered an HTTP error, or answered something other than a
            chat completion (an HTML page, JSON without `choices`).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        prompts: str | Path = JUDGE_PROMPTS,
        timeout: float = 120.0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.prompts = json.loads(Path(prompts).read_text(encoding="utf-8"))
        missing = {"system", "content_consistency", "edit_accuracy"} - set(self.prompts)
        if missing:
            raise ValueError(f"{prompts} lacks the prompts {sorted(missing)}.")
        self.timeout = timeout

    def score(self, source: ImageInput, target: ImageInput, query: ImageInput, edit: ImageInput) -> JudgeScores:
        """Both scores of one edit: the exemplar (source, target), the query and its edit are shown in that order. A
        score the answer does not state clearly is None (never guessed); the answers are kept."""
        images = [_data_url(image) for image in (source, target, query, edit)]
        answers = {name: self._ask(self.prompts[name], images) for name in ("content_consistency", "edit_accuracy")}
        scores = {name: parse_judge_score(answer) for name, answer in answers.items()}
        return JudgeScores(scores["content_consistency"], scores["edit_accuracy"], answers)

    def _ask(self, prompt: str, images: list[str]) -> str:
        content = [{"type": "text", "text": prompt}]
        content += [{"type": "image_url", "image_url": {"url": url}} for url in images]
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [{"role": "system", "content": self.prompts["system"]}, {"role": "user", "content": content}],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", errors="replace") if error.fp is not None else ""
            raise JudgeError(f"The judge endpoint {self.url} answered HTTP {error.code} {error.reason}: "
                             f"{_one_line(detail)}") from None  # fmt: skip
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise JudgeError(f"The judge endpoint {self.url} could not be reached ({reason}; timeout "
                             f"{self.timeout:g} s).") from None  # fmt: skip
        try:
            return json.loads(text)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"The judge endpoint {self.url} answered something other than a chat completion: {_one_line(text)}"
            ) from None


def _data_url(image: ImageInput) -> str:
    buffer = io.BytesIO()
    to_rgb_image(image, name="image", min_side=1).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _one_line(text: str, limit: int = 200) -> str:
    """The first `limit` characters of `text`, on one line, quoted."""
    return repr(" ".join(text.split())[:limit])


#: Where a judge's answer states its score: the number before "/5" or "out of 5", after "Score:" / "Rating:", or the
#: number the answer starts with (the prompts ask for the score first).
_SCORE_PATTERNS = (
    re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)\s*(?:/|out of|of)\s*5\b", re.I),
    re.compile(r"\b(?:score|rating)\b\W{0,4}\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)", re.I),
    re.compile(r"\A\s*\**\s*(-?\d+(?:\.\d+)?)(?![\d.]*\s*(?:/|out of|of)\s*\d)(?=\W|\Z)"),
)


def parse_judge_score(answer: str) -> int | None:
    """The 5-point score a judge's answer states, or None where it states none clearly.

    The score is the number before "/5" (or "out of 5"), after "Score:", or the one the answer starts with (as the
    prompts ask: "4. The colours match."). Every statement found must agree, and the score must be a whole number
    from 1 to 5: "0/5" and "Score: 0 (out of 5)" are None (outside the scale), "3/5 or 4/5" is None (ambiguous), and
    so is "3.5/5". Nothing is guessed from other numbers in the text.

    Args:
        answer: the judge's reply.
    """
    found = {float(match.group(1)) for pattern in _SCORE_PATTERNS for match in pattern.finditer(answer)}
    if len(found) != 1:
        return None
    (score,) = found
    return int(score) if score.is_integer() and 1 <= score <= 5 else None
