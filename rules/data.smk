# Datasets: the embedded demo dataset, a dataset's index, a part of an indexed dataset.
# Code: stages/sample.py, stages/index.py, stages/subset.py (library: pipeline/widerface.py,
# pipeline/sample.py). Writes under the data folder: raw/{dataset}/, interim/index/{dataset}/.


rule sample:
    output:
        directory(T("raw", "{dataset}")),
    log:
        "logs/sample/{dataset}.log",
    conda:
        SOFTWARE
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        images=lambda wc: flag("images", DATASETS[wc.dataset]["max_images"]),
        code=code_hash("stages.sample"),
    shell:
        confrank("sample", "sample --out {output} {params.images}")


rule index:
    input:
        index_input,
    output:
        images=T("images", "{dataset}"),
        gt=T("gt", "{dataset}"),
    log:
        "logs/index/{dataset}.log",
    wildcard_constraints:
        dataset=f"{_sources('folder')}|{_sources('sample')}",
    conda:
        SOFTWARE
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        root=lambda wc: flag("root", index_root(wc)),
        format=lambda wc: flag("format", DATASETS[wc.dataset]["format"]),
        split=lambda wc: flag("split", DATASETS[wc.dataset]["split"]),
        code=code_hash("stages.index"),
    shell:
        confrank("index", "index --name {wildcards.dataset} {params.root} {params.format} {params.split}")


rule subset:
    input:
        images=lambda wc: T("images", DATASETS[wc.dataset]["subset_of"]),
        gt=lambda wc: T("gt", DATASETS[wc.dataset]["subset_of"]),
    output:
        images=T("images", "{dataset}"),
        gt=T("gt", "{dataset}"),
    log:
        "logs/index/{dataset}.log",
    wildcard_constraints:
        dataset=_sources("subset"),
    conda:
        SOFTWARE
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        parent=lambda wc: DATASETS[wc.dataset]["subset_of"],
        half=lambda wc: flag("half", DATASETS[wc.dataset].get("half")),
        images=lambda wc: flag("max-images", DATASETS[wc.dataset].get("max_images")),
        code=code_hash("stages.subset"),
    shell:
        confrank("subset", "subset --parent {params.parent} --name {wildcards.dataset} {params.half} {params.images}")
