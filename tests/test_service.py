"""The /predict contract in-process: request validation, the envelope, the predictor on a real ResNet."""

from __future__ import annotations

import base64
import copy
import io
import json

import pytest
import torch
from PIL import Image

from serving.service import RequestError, parse_request, respond
from skinlesion.image import decode_image
from skinlesion.model import CLASS_NAMES


def jpeg_b64(size: tuple[int, int] = (120, 90)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (180, 120, 90)).save(buffer, "JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_defaults_and_normalisation() -> None:
    request = parse_request({"image": jpeg_b64(), "precision": "hIgH", "method": "GradCAM"})
    assert (request.explain, request.precision, request.method) == (False, "High", "gradcam")
    assert parse_request({"image": jpeg_b64()}).precision == "Medium"


def test_data_url_prefix_and_raw_bytes_body() -> None:
    body = json.dumps({"image": "data:image/jpeg;base64," + jpeg_b64()}).encode()
    assert parse_request(body).image[:2] == b"\xff\xd8"


def test_line_wrapped_base64_decodes_to_the_same_bytes() -> None:
    plain = jpeg_b64((300, 200))
    wrapped = base64.encodebytes(base64.b64decode(plain)).decode()  # 76-character lines, as `base64` writes
    assert "\n" in wrapped
    assert parse_request({"image": wrapped}).image == parse_request({"image": plain}).image
    assert parse_request({"image": "data:image/jpeg;base64,\n" + wrapped}).image == base64.b64decode(plain)
    with pytest.raises(RequestError, match="not valid base64"):
        parse_request({"image": wrapped.replace("\n", "\n!", 1)})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not valid JSON"),
        ([1, 2], "JSON object"),
        ("text", "JSON object"),
        (None, "JSON object"),
        ({}, "'image' is required"),
        ({"image": 5}, "'image' must be a base64 string, not a number"),
        ({"image": ["a"]}, "not an array"),
        ({"image": "@@@@"}, "not valid base64"),
        ({"image": "abc"}, "not valid base64"),
        ({"image": jpeg_b64(), "explain": "yes"}, "'explain' must be true or false"),
        ({"image": jpeg_b64(), "explain": 1}, "'explain' must be true or false"),
        ({"image": jpeg_b64(), "precision": "Ultra"}, "'precision' must be one of Low, Medium, High"),
        ({"image": jpeg_b64(), "precision": 3}, "'precision' must be one of"),
        ({"image": jpeg_b64(), "method": "shap"}, "'method' must be one of lime, gradcam"),
        ({"image": jpeg_b64(), "explain_class": "Mole"}, "'explain_class' must be one of the classes " + ", ".join(CLASS_NAMES)),
        ({"image": jpeg_b64(), "explain_class": None}, "'explain_class' must be one of the classes"),
        ({"image": jpeg_b64(), "explain_class": 4}, "'explain_class' must be one of the classes"),
    ],
)
def test_client_mistakes_raise_request_error(body, message: str) -> None:
    with pytest.raises(RequestError, match=message) as error:
        parse_request(body)
    assert error.value.status == 400


def test_predictor_returns_seven_probabilities_summing_to_one(predictor, fullres_images) -> None:
    (result,) = predictor.predict([decode_image(fullres_images[0].read_bytes())])
    assert list(result["probabilities"]) == list(CLASS_NAMES)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["prediction"] == max(result["probabilities"], key=result["probabilities"].get)
    assert result["probability"] == max(result["probabilities"].values())
    assert result["model"] == "resnet18"


def test_probabilities_are_the_network_s_softmax_and_bfloat16_stays_close(predictor, fullres_images) -> None:
    inputs = torch.stack([predictor.preprocess(decode_image(p.read_bytes())) for p in fullres_images[:4]])
    exact = predictor.probabilities(inputs)
    # The plain network in the default (NCHW) layout: the predictor's channels-last path must agree with it.
    plain = copy.deepcopy(predictor.model).to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        reference = predictor.calibration.probabilities(plain(inputs.contiguous()))
    assert torch.allclose(exact, reference, atol=1e-5)
    fast = predictor.probabilities(inputs, bfloat16=True)
    assert fast.dtype == torch.float32 and torch.allclose(fast.sum(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(fast, exact, atol=0.02) and not torch.equal(fast, exact)


def test_respond_batches_good_and_bad_bodies_independently(predictor) -> None:
    good = {"image": jpeg_b64()}
    answers = respond(predictor, [good, b"{", {"image": base64.b64encode(b"not an image").decode()}, good])
    assert [status for status, _ in answers] == [200, 400, 400, 200]
    assert answers[0][1] == answers[3][1] and answers[0][1]["success"] is True
    for _, payload in answers[1:3]:
        assert payload["success"] is False and payload["error"]
    json.dumps([payload for _, payload in answers])  # TorchServe serializes with json.dumps


def test_a_batching_server_sends_explanation_requests_elsewhere(predictor) -> None:
    good, explain = {"image": jpeg_b64()}, {"image": jpeg_b64(), "explain": True, "method": "gradcam"}
    bad_explain = {"image": "%%%%", "explain": True}
    answers = respond(predictor, [explain, good, bad_explain, good], explanations_at="/predictions/skin-explain")
    assert [status for status, _ in answers] == [307, 200, 400, 200]
    assert answers[0][1] == {"success": False, "error": answers[0][1]["error"]}
    assert "/predictions/skin-explain" in answers[0][1]["error"]
    assert "explanation" not in answers[1][1] and answers[1][1] == answers[3][1]
    # Without a place to send them, explanations are answered in place.
    [(status, payload)] = respond(predictor, [explain])
    assert status == 200 and payload["explanation"]["method"] == "gradcam"


def test_respond_reports_where_the_batch_spent_its_time(predictor, fullres_images) -> None:
    timings: dict[str, float] = {}
    body = {"image": base64.b64encode(fullres_images[0].read_bytes()).decode()}
    [(status, _)] = respond(predictor, [body], timings)
    assert status == 200
    assert set(timings) == {"decode", "preprocess", "forward"}
    assert all(value > 0 for value in timings.values())
    # Decoding a 600x450 JPEG, resizing it and a ResNet forward each take real time, not nothing.
    assert timings["forward"] > 0.5


def test_a_model_failure_is_a_500_envelope_and_not_an_exception(predictor, monkeypatch) -> None:
    def broken(inputs, batch_size=64):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(predictor, "outputs", broken)
    [(status, payload)] = respond(predictor, [{"image": jpeg_b64()}])
    assert status == 500 and payload["success"] is False


def test_same_image_same_probabilities(predictor) -> None:
    first = respond(predictor, [{"image": jpeg_b64()}])[0][1]["probabilities"]
    second = respond(predictor, [{"image": jpeg_b64()}])[0][1]["probabilities"]
    assert first == second


def test_explain_adds_both_fields_for_the_predicted_class(predictor) -> None:
    [(status, payload)] = respond(predictor, [{"image": jpeg_b64(), "explain": True, "method": "gradcam"}])
    assert status == 200 and payload["success"] is True
    assert payload["explanation"]["label"] == payload["prediction"]
    assert len(payload["explain"]) == 90 and len(payload["explain"][0]) == 120  # original size, under 300 px
    json.dumps(payload)


def test_explain_class_explains_the_class_asked_for(predictor) -> None:
    assert parse_request({"image": jpeg_b64(), "explain_class": "melanoma"}).explain_class == "Melanoma"
    assert parse_request({"image": jpeg_b64()}).explain_class is None
    body = {"image": jpeg_b64(), "explain": True, "method": "gradcam"}
    [(_, predicted)] = respond(predictor, [body])
    other = next(name for name in CLASS_NAMES if name != predicted["prediction"])
    [(status, payload)] = respond(predictor, [{**body, "explain_class": other.upper()}])
    assert status == 200 and payload["prediction"] == predicted["prediction"]
    assert payload["explanation"]["label"] == other
    assert payload["explanation"]["check"]["probability"] == payload["probabilities"][other]
    [(status, payload)] = respond(predictor, [{**body, "explain_class": "Mole"}])
    assert status == 400 and all(name in payload["error"] for name in CLASS_NAMES)


def test_a_failing_explanation_is_a_500_envelope(predictor, monkeypatch) -> None:
    import serving.service

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(serving.service, "explanation_payload", broken)
    [(status, payload)] = respond(predictor, [{"image": jpeg_b64(), "explain": True}])
    assert status == 500 and payload == {"success": False, "error": payload["error"]}
