// The review page: accept or correct labels with the mouse or the keyboard.
// Every write is a POST to /api/reviews with the page's CSRF token in a header.
"use strict";

const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
const cards = Array.from(document.querySelectorAll(".card"));
const selectionBar = document.getElementById("selection-bar");
const message = document.getElementById("message");
let focused = cards.length ? 0 : -1;

function verdictOf(card, label) {
  const face = card.dataset.face;
  return {
    image_id: Number(card.dataset.imageId),
    model_version: card.dataset.version,
    face_index: face === "" ? null : Number(face),
    label: label,
  };
}

function show(text, isError) {
  message.textContent = text;
  message.className = isError ? "error" : "";
}

async function review(targets, labelOf) {
  const verdicts = targets.map((card) => verdictOf(card, labelOf(card)));
  targets.forEach((card) => card.classList.add("saving"));
  try {
    const response = await fetch("/api/reviews", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken },
      body: JSON.stringify({ reviews: verdicts }),
      credentials: "same-origin",
    });
    const body = await response.json();
    if (!response.ok) {
      show(body.error || "refused (" + response.status + ")", true);
      return;
    }
    body.saved.forEach((saved, index) => {
      const card = targets[index];
      card.classList.add("reviewed");
      card.dataset.human = saved.label;
      card.querySelector(".human").innerHTML = "";
      const text = document.createTextNode("human: ");
      const bold = document.createElement("b");
      bold.textContent = saved.label;
      card.querySelector(".human").append(text, bold, " (" + saved.reviewer + ")");
    });
    show("saved " + body.saved.length + (body.saved.length === 1 ? " verdict" : " verdicts"), false);
  } catch (problem) {
    show("not saved: " + problem, true);
  } finally {
    targets.forEach((card) => card.classList.remove("saving"));
  }
}

function classesOf(card) {
  return JSON.parse(card.dataset.classes);
}

function setFocus(index) {
  if (!cards.length) return;
  focused = Math.max(0, Math.min(cards.length - 1, index));
  cards.forEach((card, position) => card.classList.toggle("focused", position === focused));
  cards[focused].focus({ preventScroll: true });
  cards[focused].scrollIntoView({ block: "nearest" });
}

function selected() {
  return cards.filter((card) => card.classList.contains("selected"));
}

function updateSelectionBar() {
  const chosen = selected();
  selectionBar.hidden = chosen.length === 0;
  document.getElementById("selection-count").textContent = chosen.length + " selected";
  const holder = document.getElementById("selection-classes");
  holder.innerHTML = "";
  if (!chosen.length) return;
  // Only the classes every selected card's model has can be applied to all of them.
  const common = chosen.map(classesOf).reduce((a, b) => a.filter((name) => b.includes(name)));
  common.forEach((name) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = name;
    button.addEventListener("click", () => {
      review(chosen, () => name).then(clearSelection);
    });
    holder.append(button);
  });
}

function clearSelection() {
  cards.forEach((card) => card.classList.remove("selected"));
  updateSelectionBar();
}

cards.forEach((card, index) => {
  // A refused or unreadable image (outside the roots, gone, corrupt) says so in place of pixels.
  const image = card.querySelector("img");
  const refused = () => {
    image.alt = "thumbnail not shown (outside the roots, missing or unreadable)";
    card.classList.add("no-thumbnail");
  };
  image.addEventListener("error", refused);
  if (image.complete && image.naturalWidth === 0 && image.currentSrc) refused();
  card.addEventListener("click", (event) => {
    const choice = event.target.closest("button[data-choice]");
    setFocus(index);
    if (choice) review([card], () => choice.dataset.choice);
  });
});

selectionBar.addEventListener("click", (event) => {
  const action = event.target.dataset.action;
  if (action === "accept-selected") review(selected(), (card) => card.dataset.label).then(clearSelection);
  if (action === "clear-selection") clearSelection();
});

document.addEventListener("keydown", (event) => {
  if (event.target.closest("form") || event.ctrlKey || event.metaKey || event.altKey) return;
  if (focused < 0) return;
  const card = cards[focused];
  const key = event.key;
  if (key === "ArrowRight" || key === "ArrowDown" || key === "j") {
    setFocus(focused + 1);
  } else if (key === "ArrowLeft" || key === "ArrowUp" || key === "k") {
    setFocus(focused - 1);
  } else if (/^[1-9]$/.test(key)) {
    const name = classesOf(card)[Number(key) - 1];
    if (name === undefined) return;
    review([card], () => name);
    setFocus(focused + 1);
  } else if (key === "a") {
    review([card], () => card.dataset.label);
    setFocus(focused + 1);
  } else if (key === " ") {
    card.classList.toggle("selected");
    updateSelectionBar();
  } else {
    return;
  }
  event.preventDefault();
});

if (cards.length) setFocus(0);
