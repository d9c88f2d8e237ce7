// tus contender of bench/peers.py: tus-js-client uploads each chunk file as one upload, CONCURRENCY at once.
// Usage: node client.mjs ENDPOINT BACKLOG_DIR COUNT CONCURRENCY   (files BACKLOG_DIR/<i>.bin)
import { readFile } from 'node:fs/promises'
import * as tus from 'tus-js-client'

const [endpoint, dir, count, concurrency] = [process.argv[2], process.argv[3], Number(process.argv[4]), Number(process.argv[5])]

function upload (index, data) {
  return new Promise((resolve, reject) => {
    const up = new tus.Upload(data, {
      endpoint,
      uploadSize: data.length,
      metadata: { filename: `${index}.bin` },
      retryDelays: null,
      onError: reject,
      onSuccess: resolve
    })
    up.start()
  })
}

let next = 0
async function worker () {
  while (next < count) {
    const index = next++
    await upload(index, await readFile(`${dir}/${index}.bin`))
  }
}

await Promise.all(Array.from({ length: concurrency }, worker))
