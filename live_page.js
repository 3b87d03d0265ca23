// The app's Live mode in the browser (a Streamlit custom component, mounted by app.py; the server side is live.py).
// Shows the camera, sends one frame at a time as a JPEG to the Live route, and draws its answer: the hand found,
// the letter, how far its hold is, and the text spelled so far. The next frame is taken only once the answer is
// back, so the frames the server cannot keep up with are never sent (dropped, not queued).

const pages = new WeakMap(); // component root -> its running page: Streamlit calls this again when `data` changes

export default function ({ data, parentElement }) {
  let page = pages.get(parentElement);
  if (!page) {
    page = start(parentElement);
    pages.set(parentElement, page);
  }
  page.data = data; // a new browser session brings a new token
  return page.stop;
}

function start(root) {
  const $ = (selector) => root.querySelector(selector);
  const video = $("video");
  const overlay = $("canvas.overlay");
  const grab = document.createElement("canvas");
  const page = { data: null, stopped: false, stream: null, text: "" };

  const say = (caption, letter = "–") => {
    $(".letter").textContent = letter;
    $(".caption").textContent = caption;
  };
  const showText = (text) => {
    page.text = text;
    $(".text").textContent = text;
  };

  $(".clear").onclick = async () => {
    const answer = await post(page.data.clear);
    if (answer.status === "ok") showText(answer.text);
  };
  $(".copy").onclick = async () => {
    const button = $(".copy");
    try {
      await navigator.clipboard.writeText(page.text);
      button.textContent = "Copied";
    } catch (err) {
      button.textContent = "Could not copy: select the text";
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  };

  page.stop = () => {
    page.stopped = true;
    if (page.stream) page.stream.getTracks().forEach((track) => track.stop());
    pages.delete(root);
  };

  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    say("The browser offers no camera here: it needs a secure page (https, or the app on localhost).");
    return page;
  }
  navigator.mediaDevices
    .getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false })
    .then(async (stream) => {
      page.stream = stream;
      if (page.stopped) return page.stop();
      video.srcObject = stream;
      await video.play();
      say("Show a letter to the camera.");
      run(page, video, overlay, grab, say, showText, $);
    })
    .catch((err) => say(`No camera: ${err.message}. Allow the camera for this page and reload it.`));
  return page;
}

async function post(url, body) {
  try {
    const response = await fetch(url, { method: "POST", body, headers: { "Content-Type": "image/jpeg" } });
    return await response.json();
  } catch (err) {
    return { status: "error", error: `The app did not answer (${err.message}).` };
  }
}

function snapshot(video, grab, maxSide, quality) {
  const scale = Math.min(1, maxSide / Math.max(video.videoWidth, video.videoHeight));
  grab.width = Math.round(video.videoWidth * scale);
  grab.height = Math.round(video.videoHeight * scale);
  grab.getContext("2d").drawImage(video, 0, 0, grab.width, grab.height);
  return new Promise((resolve) => grab.toBlob(resolve, "image/jpeg", quality));
}

async function run(page, video, overlay, grab, say, showText, $) {
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const times = []; // when the last answers came back, for the frame rate shown
  while (!page.stopped) {
    const began = performance.now();
    if (video.readyState >= 2 && video.videoWidth > 0) {
      const frame = await snapshot(video, grab, page.data.max_side, page.data.quality);
      const answer = await post(page.data.frame, frame);
      if (page.stopped) break;
      if (answer.status === "ok") {
        show(answer, video, overlay, page.data.connections, say, $);
        showText(answer.text);
        const now = performance.now();
        times.push(now);
        while (times.length && now - times[0] > 2000) times.shift();
        $(".status").textContent = `${(times.length / 2).toFixed(1)} frames/s read, ` +
          `${Math.round(now - began)} ms a frame`;
      } else if (answer.status !== "busy") {
        say(answer.error || "The app could not read the frame.");
        clear(overlay);
      }
    }
    await sleep(Math.max(0, 1000 / page.data.fps - (performance.now() - began)));
  }
}

function clear(overlay) {
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
}

function show(answer, video, overlay, connections, say, $) {
  // the page shows what the model read: the frame mirrored when the sidebar asks for it
  video.classList.toggle("mirrored", answer.mirrored);
  overlay.width = video.clientWidth;
  overlay.height = video.clientHeight;
  clear(overlay);
  if (answer.hand) drawHand(overlay, answer.hand, connections);
  const percent = `${(answer.probability * 100).toFixed(1)}%`;
  if (answer.no_hand) {
    say(answer.looks_for_hands && !answer.hand ? "No hand found." : "No sign: the empty scene.");
  } else if (answer.answered) {
    say(`${answer.label}, probability ${percent}`, answer.label);
  } else if (answer.disagreed) {
    say(`Not sure: the image and the hand's shape point to different letters (best guess ${answer.label}).`, "?");
  } else {
    say(`Not sure: best guess ${answer.label}, probability ${percent}.`, "?");
  }
  $(".bar").style.width = `${Math.round(answer.progress * 100)}%`;
}

function drawHand(overlay, hand, connections) {
  const ctx = overlay.getContext("2d");
  const w = overlay.width;
  const h = overlay.height;
  const line = Math.max(2, Math.round(Math.max(w, h) / 160));
  ctx.lineWidth = line;
  if (hand.crop) {
    const [l, t, r, b] = hand.crop;
    ctx.strokeStyle = "rgb(80, 160, 255)";
    ctx.strokeRect(l * w, t * h, (r - l) * w, (b - t) * h);
  }
  const [x0, y0, x1, y1] = hand.box;
  ctx.strokeStyle = "rgb(255, 200, 0)";
  ctx.strokeRect(x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h);
  ctx.strokeStyle = "rgb(0, 255, 120)";
  for (const [a, b] of connections) {
    ctx.beginPath();
    ctx.moveTo(hand.points[a][0] * w, hand.points[a][1] * h);
    ctx.lineTo(hand.points[b][0] * w, hand.points[b][1] * h);
    ctx.stroke();
  }
  ctx.fillStyle = "rgb(255, 40, 80)";
  for (const [x, y] of hand.points) {
    ctx.beginPath();
    ctx.arc(x * w, y * h, 1.5 * line, 0, 2 * Math.PI);
    ctx.fill();
  }
}
