"""The trainers of our stages, each over transformers' Trainer or a TRL trainer where one exists:

* `lm`: LeanTrainer (pretraining.py, supervised_finetuning.py): the loss on supervised positions only, without
  full-vocabulary logits, packed rows run one after another within a step, token accounting.
* `dpo`: MedDPOTrainer (dpo_training.py): TRL's DPOTrainer on packed pairs, every TRL --loss_type.
* `preference`: what the reward-model, DPO, ORPO and CPO stages share around their trainer.
* `ppo`: PPO for language models (ppo_training.py), written here because TRL 1.13+ has no PPOTrainer.
"""
