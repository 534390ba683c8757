rule report:
    """LaTeX tables (Jinja2) with HTML twins, matplotlib figures, results.csv, the provenance table and a main.tex
    that includes the tables and figures. `snakemake --report` shows the files marked in REPORT_SHOWN."""
    input:
        results=all_eval_paths(),
        analysis=all_analysis_paths(),
    output:
        main=report_outputs()[0],
        rest=[report_output(*item) for item in report_items()[1:]],
    params:
        out_dir=lambda wc, output: os.path.dirname(output.main),
        title=config["report"]["title"],
        order=method_order(),
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "python -m hetmerge report --results {input.results:q} --analysis {input.analysis:q} "
        "--out-dir {params.out_dir:q} --title {params.title:q} "
        "--method-order {params.order:q} > {log:q} 2>&1"


rule paper_pdf:
    """Optional: compile results/paper/main.tex (needs a LaTeX installation)."""
    input:
        report_outputs(),
    output:
        f"{RESULTS}/paper/main.pdf",
    params:
        paper=lambda wc, output: os.path.dirname(output[0]),
        log=lambda wc, log: os.path.abspath(log[0]),
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/paper_pdf.log",
    shell:
        "cd {params.paper:q} && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex > {params.log:q} 2>&1"
