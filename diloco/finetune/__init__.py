"""Fine-tune a model on your data: ``python -m diloco.finetune model.path=DIR data.path=F``.

Steps (the module that owns each):

    config.split        conf/finetune.yaml -> the training run's Config + model.path, lora.*,
                        prompt/response fields (one-line errors naming the key)
    models.open_source  the model folder checked (Hugging Face causal LM or diloco.train run
                        dir), its tokenizer; no weights loaded yet
    data.read           the user's .txt/.jsonl read and checked, line by line
    data.build_corpus   tokenized: packed text, or prompt/response examples whose targets
                        mask the prompt (-100); a fixed held-out fraction is the eval set
    run.run             weights loaded (LoRA adapters added), the usual build_parts and
                        Trainer (any algorithm, workers.count, codec ...), eval before, fit,
                        the result saved in the model's own format, summary.json
"""
