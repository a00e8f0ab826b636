"""Read untrusted XML safely and write an ElementTree back with the prefixes it came with.

`parse` refuses a document type declaration before anything is parsed (no entity can be declared,
so no entity can be expanded: defusedxml's rule) and returns the tree with its comments, plus every
prefix -> URI binding the document declared, in document order. `assign_prefixes` turns those into
one prefix per URI (a prefix bound to two URIs in two places gets a numbered twin), and `serialize`
writes the tree with them: ElementTree's own writer would rename every prefix it was not told
about to `ns0`, `ns1`, ..., and some XMP readers look properties up by prefix.

`serialize` is deterministic and a fixed point (serialize . parse . serialize == serialize): it
re-indents elements whose text is only whitespace between child elements (one space a level, as
exiftool writes), and writes every other element's text exactly as it came, so whitespace that
carries meaning (a literal value, an `rdf:parseType="Literal"` body) is kept.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NoReturn
from xml.parsers import expat

XML_NAMESPACE = "http://www.w3.org/XML/1998/namespace"
RDF_PARSE_TYPE = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}parseType"
XML_WHITESPACE = " \t\r\n"
INDENT = " "


class XmlRefused(ValueError):
    """Bytes that are not well-formed XML, or XML that declares a document type."""


def parse(data: bytes) -> tuple[ET.Element, list[tuple[str, str]]]:
    """The root element (comments kept) and the (prefix, URI) bindings in document order."""
    bindings = _check_and_collect_bindings(data)
    builder = ET.TreeBuilder(insert_comments=True, insert_pis=True)
    parser = ET.XMLParser(target=builder)
    try:
        parser.feed(data)
        root: ET.Element = parser.close()
    except ET.ParseError as error:  # the check above parsed it already: only a safety net
        raise XmlRefused(f"not well-formed XML ({error})") from error
    return root, bindings


def _check_and_collect_bindings(data: bytes) -> list[tuple[str, str]]:
    # Expat reports the DOCTYPE when it starts, before any of its entities is declared, so raising
    # there means no entity (billion laughs, external files) is ever expanded.
    def refuse_doctype(*_: object) -> NoReturn:
        raise XmlRefused("a document type (DOCTYPE or ENTITY) declaration is not allowed")

    bindings: list[tuple[str, str]] = []

    def collect(prefix: str | None, uri: str | None) -> None:
        if uri:  # xmlns="" undeclares; it binds nothing
            bindings.append((prefix or "", uri))

    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartDoctypeDeclHandler = refuse_doctype
    parser.EntityDeclHandler = refuse_doctype
    parser.StartNamespaceDeclHandler = collect
    try:
        parser.Parse(data, True)
    except expat.ExpatError as error:
        raise XmlRefused(f"not well-formed XML ({expat.errors.messages[error.code]})") from error
    return bindings


def assign_prefixes(bindings: Iterable[tuple[str, str]], root: ET.Element) -> dict[str, str]:
    """One prefix per namespace URI used under `root`: the first prefix the bindings give it."""
    prefixes: dict[str, str] = {XML_NAMESPACE: "xml"}
    taken = {"xml", "xmlns"}
    for prefix, uri in bindings:
        if uri not in prefixes:
            prefixes[uri] = _free_prefix(prefix or "ns", taken)
    for uri in _namespaces(root.iter()):
        if uri not in prefixes:  # an element ElementTree made up without a binding
            prefixes[uri] = _free_prefix("ns", taken)
    return prefixes


def _free_prefix(wanted: str, taken: set[str]) -> str:
    prefix, number = wanted, 0
    while prefix in taken:
        number += 1
        prefix = f"{wanted}{number}"
    taken.add(prefix)
    return prefix


def serialize(
    root: ET.Element,
    prefixes: Mapping[str, str],
    *,
    declares_subtree: Callable[[ET.Element], bool],
) -> str:
    """`root` as XML text; each namespace is declared where first used, or, on an element for
    which `declares_subtree` is true, all its subtree's namespaces at once (XMP's convention for
    `rdf:Description`)."""
    writer = _Writer(prefixes, declares_subtree)
    writer.element(root, in_scope=frozenset({XML_NAMESPACE}), depth=0, verbatim=False)
    return "".join(writer.parts)


class _Writer:
    def __init__(
        self, prefixes: Mapping[str, str], declares_subtree: Callable[[ET.Element], bool]
    ) -> None:
        self.prefixes = prefixes
        self.declares_subtree = declares_subtree
        self.parts: list[str] = []

    def element(
        self, element: ET.Element, *, in_scope: frozenset[str], depth: int, verbatim: bool
    ) -> None:
        kind: object = element.tag  # ElementTree marks comments by a function as the tag
        if kind is ET.Comment:
            self.parts.append(f"<!--{element.text or ''}-->")
            return
        if kind is ET.ProcessingInstruction:
            self.parts.append(f"<?{element.text or ''}?>")
            return
        used = element.iter() if self.declares_subtree(element) else iter([element])
        declared = [uri for uri in _namespaces(used) if uri not in in_scope]
        in_scope = in_scope | set(declared)
        name = self.name(element.tag)
        self.parts.append(f"<{name}")
        for uri in declared:
            self.parts.append(f' xmlns:{self.prefixes[uri]}="{_escape_attribute(uri)}"')
        for key, value in element.attrib.items():
            self.parts.append(f' {self.name(key)}="{_escape_attribute(value)}"')
        children = list(element)
        if not children and not element.text:
            self.parts.append("/>")
            return
        self.parts.append(">")
        verbatim = verbatim or element.get(RDF_PARSE_TYPE) == "Literal" or not _indentable(element)
        if verbatim:
            self.parts.append(_escape_text(element.text or ""))
        for child in children:
            if not verbatim:
                self.parts.append("\n" + INDENT * (depth + 1))
            self.element(child, in_scope=in_scope, depth=depth + 1, verbatim=verbatim)
            if verbatim:
                self.parts.append(_escape_text(child.tail or ""))
        if not verbatim:
            self.parts.append("\n" + INDENT * depth)
        self.parts.append(f"</{name}>")

    def name(self, tag: str) -> str:
        if not tag.startswith("{"):
            return tag
        uri, local = tag[1:].split("}", 1)
        return f"{self.prefixes[uri]}:{local}"


def _indentable(element: ET.Element) -> bool:
    # Whitespace between child elements means nothing in RDF/XML; any other text is content.
    return len(element) > 0 and all(
        not text.strip(XML_WHITESPACE)
        for text in [element.text or "", *(child.tail or "" for child in element)]
    )


def _namespaces(elements: Iterator[ET.Element]) -> list[str]:
    """The URIs of the elements' tags and attributes, in document order, without repeats."""
    found: dict[str, None] = {}
    for element in elements:
        if not isinstance(element.tag, str):  # a comment or processing instruction
            continue
        for name in [element.tag, *element.attrib]:
            if name.startswith("{"):
                found.setdefault(name[1:].split("}", 1)[0])
    found.pop(XML_NAMESPACE, None)
    return list(found)


def _escape_text(text: str) -> str:
    # A raw carriage return would come back as a line feed: written as a reference, it stays.
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")
    )


def _escape_attribute(value: str) -> str:
    # Attribute values are normalized on reading (tab and line breaks become spaces) unless
    # written as references.
    return _escape_text(value).replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")
