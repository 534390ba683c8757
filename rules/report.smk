rule report:
    """Tables (LaTeX and HTML from one table), figures, CSVs and main.tex: every layout's declared files. Reads
    only result JSON files and the report spec (labels, rows, tables), so it needs no torch and a label edit
    reruns nothing else. `snakemake --report` shows the files whose layouts give a caption."""
    input:
        REPORT["inputs"],
    output:
        [report_output(output) for output in REPORT["outputs"]],
    log:
        f"{RESULTS}/logs/report/{NAME}.log",
    conda:
        "../envs/hetmerge.yaml"
    params:
        spec=json.dumps(REPORT["spec"], sort_keys=True),
        code=REPORT["code"],
        folder=lambda wc, output: os.path.dirname(output[0]),  # main.tex comes first
    shell:
        'python -m hetmerge report --plan "$HETMERGE_PLAN" --out-dir {params.folder:q} > {log:q} 2>&1'


rule paper_pdf:
    """Optional: compile the report's main.tex (needs a LaTeX installation)."""
    input:
        REPORT_FILES,
    output:
        f"{REPORT['folder']}/main.pdf",
    log:
        f"{RESULTS}/logs/paper_pdf/{NAME}.log",
    conda:
        "../envs/hetmerge.yaml"
    params:
        main=lambda wc, input: input[0],  # main.tex comes first
    shell:
        # -cd: LaTeX runs in main.tex's folder, where its \input and \includegraphics paths start
        "latexmk -cd -pdf -interaction=nonstopmode -halt-on-error {params.main:q} > {log:q} 2>&1"
