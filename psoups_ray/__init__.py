"""psoups_ray: Personalized Soups (P-Soups, arXiv 2310.11564) on Ray.

One reward model and one LoRA policy per preference pole, trained in parallel
with Ray Train, merged per combination of poles ("soups") with weights searched
by Ray Tune, and served with Ray Serve. See the README for the pipeline.
"""

__version__ = "0.1.0"
