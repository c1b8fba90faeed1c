# The model server image (and the Streamlit page's): Python 3.11, Java 17 for TorchServe, the pinned
# requirements, the project and the model archives, built here by archive.sh from model_store/*.pt.
#   docker build -t skin-lesion .        (docker compose builds it too)
# Bookworm: the last Debian release with openjdk-17, the Java that TorchServe 0.12 is tested with.
FROM python:3.11-slim-bookworm

# tini is PID 1: it passes `docker stop`'s SIGTERM to the whole process group (-g) and reaps orphans.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt ./
# The CPU builds of torch/torchvision (same versions as the pins): PyPI's default wheels bring CUDA,
# gigabytes that a CPU container never uses.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY skinlesion/ skinlesion/
COPY serving/ serving/
COPY frontend/ frontend/
COPY .streamlit/ .streamlit/
COPY archive.sh serve.py client.py config.properties log4j2.xml ./
COPY model_store/resnet18.pt model_store/resnet34.pt model_store/
# The archives hold the weights, so the state dicts need not stay in the image.
RUN ARCHIVER=torch-model-archiver ./archive.sh && rm model_store/*.pt

# Unprivileged at run time; TorchServe writes its logs and pid file under /app/logs.
RUN useradd --create-home --uid 10001 skin && mkdir logs && chown skin logs
USER skin

# PYTHONPATH: the page (frontend/app.py) imports client, serving and skinlesion from /app, as the editable install
# of setup.sh provides them locally.
ENV MODEL=resnet34 PYTHONUNBUFFERED=1 PYTHONPATH=/app
EXPOSE 8080 8501
ENTRYPOINT ["tini", "-g", "--"]
CMD ["python", "serve.py", "torchserve", "--bind", "0.0.0.0"]
