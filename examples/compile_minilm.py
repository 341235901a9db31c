"""Compile the real all-MiniLM-L6-v2 with the Python API, check it, save it.

    python examples/compile_minilm.py
"""
import torch
import transformers

import moh_compile
from moh_compile.loading import minilm_path

path = minilm_path()
model = transformers.AutoModel.from_pretrained(path).eval()
tok = transformers.AutoTokenizer.from_pretrained(path)
batch = tok(["moh-compile rewrites transformers.", "It keeps the outputs identical at its identity setting."],
            padding=True, return_tensors="pt")
inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

print(moh_compile.inspect(model, inputs).report.markdown())
compiled = moh_compile.compile(model, inputs, moh_compile.CompileConfig(attention="identity", ffn="identity"))
with torch.no_grad():
    diff = (compiled(**inputs).last_hidden_state - model(**inputs).last_hidden_state).abs().max().item()
print(f"max |compiled - original| = {diff:.2e}")
compiled.save("out/minilm_api", force=True)
print("saved out/minilm_api/{model.pt2,plan.json,report.md,report.json}")
