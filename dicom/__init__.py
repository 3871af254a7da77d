"""Everything that reads or writes DICOM.

elements     the one raw element reader and its constants (VRs, delimiters, syntaxes)
header_scan  the fast header scan; its wanted tags come from instance's rules
instance     what an instance must be and what we keep from it: the DICOM rules
image_ranges the ``images`` string of a series (``"1-3,5"``)
batch        an import batch: temporary names, durability, one transaction, rename
archives     zip / tar.gz entries of uploads, bounded and untrusted
importer     the one import entry: /single, uploads (task), the CLI
volumes      series or descriptor -> numpy volume (HU for CT), MHD/RAW, plug-in input
tag_dump     the anonymised tag dump given to plug-ins
web          DICOMweb (PS3.18): QIDO-RS, WADO-RS and STOW-RS over the stored series
errors       DicomImportError and its subclasses
"""
