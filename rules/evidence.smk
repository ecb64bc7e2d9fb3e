# Per-box image evidence: a face-trained network (config `image_evidence`) read at every box.
# Code: stages/image_features.py (library: pipeline/ranker/image_evidence.py). Writes:
# interim/image_features/. Targets ask for it where a ranker reads the image evidence.


rule image_features:
    input:
        boxes=T("oracle_dir", "{dataset}", "{detector}", "{scales}"),
        images=T("images", "{dataset}"),
    output:
        directory(T("image_features_dir", "{dataset}", "{detector}", "{scales}")),
    log:
        "logs/image_features/{dataset}/{detector}/{scales}.log",
    conda:
        SOFTWARE
    threads: 1
    resources:
        # an 8K frame decodes to ~130 MB and is then downscaled to 1024 px: 3 GB holds both
        mem_mb=3000,
        runtime=60,
    params:
        weights=config["weights_dir"],
        net=config["image_evidence"]["net"],
        max_side=config["image_evidence"]["max_side"],
        code=code_hash("stages.image_features"),
    shell:
        confrank(
            "image_features",
            "image-features --dataset {wildcards.dataset} --detector {wildcards.detector} --scales {wildcards.scales}"
            " --evidence-net {params.net} --max-side {params.max_side}",
            env=WEIGHTS_ENV,
            device=True,
        )
