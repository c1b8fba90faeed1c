"""Streamlit page for the skin-lesion classifier: upload images, see predictions and explanations.

Run from the repo root: `streamlit run frontend/app.py` (port 8501). It talks to the /predict API
over HTTP (env SKIN_API_URL) through client.py; it does not load the model.
"""

from __future__ import annotations

import base64
import hashlib
import os
import urllib.parse
import uuid

import altair as alt
import pandas as pd
import streamlit as st

from client import MAX_UPLOAD_MB, AnswerCache, ClientError, check_line, get_model_card, post_predict
from serving.settings import DEFAULT_PREDICT_URL, EXPECTED_SECONDS
from skinlesion.options import COVERAGE_LEVELS, DEFAULT_COVERAGE, METHODS, PRECISIONS

API_URL = os.environ.get("SKIN_API_URL", DEFAULT_PREDICT_URL)
# Answers kept per browser session (an explanation's PNG is up to about 1 MB).
CACHED_ANSWERS = 32

METHOD_NAMES = {"lime": "LIME", "gradcam": "Grad-CAM", "gradient": "Gradients"}


def expected_seconds(explain: bool, method: str, precision: str) -> float:
    """One request's work on an idle server (the wait grows with the queue)."""
    if not explain:
        return EXPECTED_SECONDS["predict"]
    return EXPECTED_SECONDS[precision if method == "lime" else method]


def classify(image: bytes, explain: bool, method: str, precision: str, coverage: float, on_busy,
             explain_class: str | None = None) -> dict:
    """The server's envelope; the latest successful answers are kept for the session so reruns don't ask again."""
    key = (API_URL, hashlib.sha1(image).hexdigest(), explain, method if explain else "", precision if explain else "",
           coverage, explain_class)
    cache = st.session_state.setdefault("answers", AnswerCache(CACHED_ANSWERS))
    return cache.get(key) or cache.put(key, post_predict(user_url(API_URL), image, explain=explain, precision=precision,
                                                         method=method, on_busy=on_busy, coverage=coverage,
                                                         explain_class=explain_class))


def ask(name: str, image: bytes, explain: bool, method: str, precision: str, coverage: float,
        explain_class: str | None = None) -> dict:
    """classify() with a spinner, "busy, retrying" while explanations are queued, and client errors as envelopes."""
    wait = expected_seconds(explain, method, precision)
    busy = st.empty()
    with st.spinner(f"Asking the server about {name} (expected wait ~{wait:.0f} s)...", show_time=True):
        try:
            return classify(image, explain, method, precision, coverage,
                            lambda seconds, message: busy.info(f"Busy, retrying in {seconds:.0f} s: {message}"),
                            explain_class)
        except ClientError as exc:
            return {"success": False, "error": str(exc)}
        finally:
            busy.empty()


def user_url(url: str) -> str:
    """The API URL naming this browser session's user: every page user reaches nginx from the page's one address,
    so on the page's own port nginx keys its per-client limits on this instead (docker-compose.yml)."""
    return f"{url}?{urllib.parse.urlencode({'user': st.session_state.setdefault('user', uuid.uuid4().hex)})}"


@st.cache_data(ttl=60, show_spinner=False)
def model_card(api_url: str) -> dict:
    try:
        return get_model_card(api_url)
    except ClientError as exc:
        return {"success": False, "error": str(exc)}


def show_model_card(card: dict) -> None:
    """The sidebar's "how good is this model" panel, from GET /model."""
    st.header("How good is this model?")
    metrics = card.get("test_metrics") if card.get("success") else None
    if not metrics:
        st.caption(f"No measured metrics from the server ({card.get('error', 'the model is not calibrated')}).")
        return
    if metrics.get("from_held_out_run"):
        st.caption(f"{card['architecture']}'s recipe on {metrics['test_images']:,} test images, trained without them "
                   "(the served weights were trained on them too):")
    else:
        st.caption(f"{card['architecture']} on {metrics['test_images']:,} test images of lesions it never saw:")
    st.markdown(
        f"- accuracy **{metrics['accuracy']:.0%}**, balanced accuracy **{metrics['balanced_accuracy']:.0%}**\n"
        f"- melanomas found **{metrics['melanoma_sensitivity']:.0%}** (melanoma AUC {metrics['melanoma_auc']:.2f})\n"
        f"- malignancy alert: finds **{metrics['malignancy_sensitivity']:.0%}** of malignant lesions, "
        f"clears {metrics['malignancy_specificity']:.0%} of benign ones\n"
        f"- calibration error {metrics['expected_calibration_error']:.3f}"
    )


def show_result(answer: dict) -> None:
    if answer.get("in_domain") is False:
        st.warning("**Not a usable lesion photo.** " + " ".join(
            w["message"][0].upper() + w["message"][1:] + "." for w in answer["warnings"] if w.get("code") == "out_of_domain"))
        st.caption(f"The model would have said {answer['prediction']} ({answer['probability']:.0%}); do not rely on it.")
        return
    st.markdown(f"**{answer['prediction']}** — probability {answer['probability']:.1%}")
    if answer.get("prediction_set"):
        coverage = answer["set_coverage"]
        st.markdown(f"{coverage:.0%} set: **{', '.join(answer['prediction_set'])}**")
        st.caption(f"The true diagnosis is in such a set for about {coverage:.0%} of photos like the ones the model was "
                   "checked on: an average over those photos, not a promise for this one.")
    if answer.get("malignancy_alert"):
        st.error(f"**Malignancy alert**: probability of a malignant lesion {answer['malignant_probability']:.0%}. "
                 "Have this lesion examined by a dermatologist.")
    elif answer.get("malignant_probability") is not None:
        st.caption(f"Probability of a malignant lesion: {answer['malignant_probability']:.0%} (below the alert threshold)")
    data = pd.DataFrame({"class": list(answer["probabilities"]), "probability": list(answer["probabilities"].values())})
    chart = alt.Chart(data).mark_bar().encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        y=alt.Y("class:N", sort=None, title=None, axis=alt.Axis(labelLimit=300)),
        tooltip=["class", alt.Tooltip("probability:Q", format=".1%")],
    )
    st.altair_chart(chart, width="stretch", height=260, alt="Probabilities of the 7 classes")
    st.caption(f"model: {answer.get('model', '?')}")


def show_explanation(answer: dict) -> None:
    explanation = answer.get("explanation")
    if not explanation or not explanation.get("image_png"):
        st.warning("The server sent no explanation for this image.")
        return
    caption = f"{METHOD_NAMES.get(explanation.get('method'), explanation.get('method'))} explanation"
    if explanation.get("method") == "lime":
        caption += f" ({explanation.get('precision')}, {explanation.get('num_samples')} samples)"
    if explanation.get("seconds") is not None:
        caption += f", {explanation['seconds']:.1f} s"
    st.image(base64.b64decode(explanation["image_png"]), caption=caption, width="stretch", alt="Explanation overlay")
    line = check_line(explanation)
    if line:
        st.markdown(line[0].upper() + line[1:] + ".")


st.set_page_config(page_title="Skin lesion classifier", layout="wide")
st.title("Skin lesion classifier")
st.warning("Research tool, not a diagnosis. Do not use it to make medical decisions; see a dermatologist.")

with st.sidebar:
    st.header("Options")
    explain = st.toggle("Explain the prediction", value=False)
    # Gradients by default: as faithful to the model as LIME or more, in a fraction of a second (docs/explanations.md).
    method = st.radio("Method", METHODS, index=METHODS.index("gradient"), format_func=METHOD_NAMES.get, horizontal=True)
    precision = st.radio("Precision (LIME)", PRECISIONS, index=1, horizontal=True, disabled=method != "lime")
    coverage = st.select_slider("Prediction set coverage", COVERAGE_LEVELS, value=DEFAULT_COVERAGE,
                                format_func=lambda level: f"{level:.0%}",
                                help="The set of diagnoses that holds the true one for this share of lesion photos.")
    st.caption(
        "Expected wait per image: "
        + ", ".join(f"{level} ~{EXPECTED_SECONDS[level]:.0f} s" for level in PRECISIONS)
        + f"; Gradients and Grad-CAM ~{EXPECTED_SECONDS['gradient']:.0f} s, on an idle server."
    )
    st.caption(f"Server: `{API_URL}`")
    show_model_card(model_card(API_URL))

uploads = st.file_uploader("Dermatoscopic images (JPEG or PNG)", type=["jpg", "jpeg", "png"], accept_multiple_files=True,
                           help=f"Up to {MAX_UPLOAD_MB} MB per image, as the API accepts.")

for upload in uploads or []:
    st.subheader(upload.name)
    image = upload.getvalue()
    columns = st.columns(3 if explain else 2)
    columns[0].image(image, caption="Original", width="stretch")
    # The plain answer first (quick, and kept): its top three are the classes one can ask to have explained.
    answer = ask(upload.name, image, False, method, precision, coverage)
    if explain and answer.get("success"):
        top = sorted(answer["probabilities"], key=answer["probabilities"].get, reverse=True)[:3]
        chosen = columns[1].selectbox("Explain", top, key=f"explain-class-{upload.file_id}",
                                      format_func=lambda name, p=answer["probabilities"]: f"{name} ({p[name]:.0%})")
        answer = ask(upload.name, image, True, method, precision, coverage,
                     None if chosen == answer["prediction"] else chosen)
    if not answer.get("success"):
        columns[1].error(f"Could not classify {upload.name}: {answer.get('error', 'no reason given')}")
        continue
    if explain:
        with columns[1]:
            show_explanation(answer)
    with columns[-1]:
        show_result(answer)

st.divider()
st.caption(
    "Trained on HAM10000: Tschandl, P., Rosendahl, C. & Kittler, H. The HAM10000 dataset, a large collection of "
    "multi-source dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018), "
    "doi:10.1038/sdata.2018.161. Licence: CC BY-NC 4.0 (non-commercial use only)."
)
