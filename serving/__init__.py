"""ftray serving: OpenAI-compatible Ray Serve for ftray models and LoRA adapters.

`serving.config` (the serve config), `serving.app` (`build_app`, the ingress, import paths for
`serve run` and RayService), `serving.engine` (the `engine: hf` deployment), `serving.generation`
(batched decoding), `serving.openai_api` (wire format). See ../shared/DESIGN.md, "Serving".
"""
