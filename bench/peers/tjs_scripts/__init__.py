# transformers.js's own ONNX conversion scripts (convert.py, quantize.py, float16.py, utils.py),
# vendored from huggingface/transformers.js (Apache-2.0; float16.py carries its own MIT notice
# from Microsoft and Hugging Face) for bench/peers/setup.sh, which runs
#   python -m tjs_scripts.convert --model_id gpt2-small-random --task text-generation-with-past --quantize --modes fp16 q8
# in bench/peers/work/venv-onnx (bench/peers/requirements-onnx.txt).
