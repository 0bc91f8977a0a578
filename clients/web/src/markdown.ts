// A small, safe Markdown renderer for streamed answers.
//
// Safe by construction: the input is HTML-escaped first, and only the tags
// built here are ever produced (p, ul/ol/li, strong, em, code, br, a). Links
// are kept only for http(s) and mailto URLs; `[Source: …]` markers become
// links to their entry in the answer's sources list (`cite(label)` gives the
// entry's id and number). No raw HTML from the model or a tool ever reaches
// the page.

/** Finds (or creates) the sources-list entry of a citation label. */
export type CiteResolver = (label: string) => { id: string; n: number };

const ESCAPES: Record<string, string> = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const SAFE_URL = /^(https?:\/\/|mailto:)/i;

/** Inline markup of one line of already-escaped text. */
function inline(escaped: string, cite: CiteResolver): string {
  // Code spans first, so their contents are left alone.
  const codes: string[] = [];
  let out = escaped.replace(/`([^`]+)`/g, (_, code: string) => {
    codes.push(`<code>${code}</code>`);
    return `\u0000${codes.length - 1}\u0000`;
  });
  out = out.replace(/\[Source: ([^\]]+)\]/g, (_, label: string) => {
    const entry = cite(unescapeHtml(label));
    return `<a class="cite" href="#${entry.id}" title="Source: ${label}">[${entry.n}]</a>`;
  });
  out = out.replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (whole, text: string, url: string) =>
    SAFE_URL.test(unescapeHtml(url))
      ? `<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${text}</a>`
      : whole,
  );
  out = out.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");
  out = out.replace(/(^|[^*\w])\*([^*\s][^*]*)\*(?!\w)/g, "$1<em>$2</em>");
  out = out.replace(/(^|\W)_([^_\s][^_]*)_(?!\w)/g, "$1<em>$2</em>");
  return out.replace(/\u0000(\d+)\u0000/g, (_, i: string) => codes[Number(i)]);
}

function unescapeHtml(text: string): string {
  return text
    .replace(/&lt;/g, "<")
    .replace(/&gt;/g, ">")
    .replace(/&quot;/g, '"')
    .replace(/&#39;/g, "'")
    .replace(/&amp;/g, "&");
}

const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;

/** Markdown text (possibly a partial, still streaming answer) as safe HTML. */
export function renderMarkdown(text: string, cite: CiteResolver): string {
  const html: string[] = [];
  let list: "ul" | "ol" | null = null;
  let paragraph: string[] = [];
  const flushParagraph = () => {
    if (paragraph.length) html.push(`<p>${paragraph.join("<br>")}</p>`);
    paragraph = [];
  };
  const closeList = () => {
    if (list) html.push(`</${list}>`);
    list = null;
  };
  for (const raw of escapeHtml(text).split("\n")) {
    const bullet = BULLET.exec(raw);
    const numbered = bullet ? null : NUMBERED.exec(raw);
    if (bullet || numbered) {
      flushParagraph();
      const kind = bullet ? "ul" : "ol";
      if (list !== kind) {
        closeList();
        html.push(`<${kind}>`);
        list = kind;
      }
      html.push(`<li>${inline((bullet ?? numbered)![1], cite)}</li>`);
    } else if (raw.trim() === "") {
      flushParagraph();
      closeList();
    } else {
      closeList();
      paragraph.push(inline(raw.trim(), cite));
    }
  }
  flushParagraph();
  closeList();
  return html.join("");
}
