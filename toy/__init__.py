"""ReDiF and DMDR on an exact 2D Gaussian-mixture diffusion (CPU): see diffusion.py first, then redif.py,
dmdr.py, baselines.py and bench.py (`python -m toy.bench`)."""
