"""A source reader: public TCGA downloads (UNI2-h slide features, UCSC Xena RNA matrices, GDC
copy-number and methylation files with their sample sheets, a clinical table) → the raw
layout `prepare --raw` reads, by the authors' cohort rules (`build`), recording what it chose
and why (provenance). It stops at the raw layout: `prepare` stays the one gate into the
dataset format."""
