"""The toy-world trainer, by stage; `python -m toyworld.train` (toyworld/train.py) is its command line.

* `settings`: the recipe (`TrainSettings`) and the model config the trainer builds (`training_config`);
* `data`: the seeded stream of train-split scenes and their rendering;
* `tokens`: captions as token ids and the positions of each object's words;
* `attention`: explicit cross-attention, the recorder patch and the grounding loss;
* `optim`: AdamW, the learning-rate schedule and the stage budget;
* `files`: the model file the run writes, the default paths, the run's environment;
* `vae`: stage 1, the VAE and the latent scale;
* `unet`: stage 2, UNet and text encoder with an EMA, checkpoints and resume;
* `cli`: the command line over both.

Importing any of them needs the ComfyUI host importable and the pack registered as `attention_edit`
(`toyworld.host.setup_host`, tests/conftest.py or bench.common.setup); none sets anything up.
"""
