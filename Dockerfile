# CPU image: docker build -t gptserve . && docker run -p 8000:8000 gptserve  (args after the image go to `gptserve`)
# torch comes from PyPI by default (its Linux wheel carries CUDA, so the same image runs on a
# GPU host with --gpus all); pass --build-arg TORCH_INDEX=<PyTorch's CPU wheel index URL> for a
# much smaller CPU-only image.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX:+--index-url "${TORCH_INDEX}"}
COPY pyproject.toml README.md ./
COPY gptserve ./gptserve
RUN pip install .

EXPOSE 8000
ENTRYPOINT ["gptserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
