"""Pretrained encoders in Flax (BERT/DistilBERT/MiniLM, CLIP/BLIP ViT, CLIP text) and strict HF weight loading.

These modules know nothing of diffusion. See `bert.py`, `vit.py`, `clip.py`, and `loading.py` for the entry point
`load_pretrained`; `export.py` writes a Flax CLIP as an HF CLIP directory (`export_clip`; with a BERT
text tower, an HF `VisionTextDualEncoderModel` directory).
"""
