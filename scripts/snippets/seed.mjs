import OpenAI from 'openai'

// The seed provider's Node snippet, run unchanged against imagegate except for baseURL and
// apiKey (env IMAGEGATE_BASE_URL, e.g. http://127.0.0.1:8080/v1, and IMAGEGATE_API_KEY,
// default: the demo key sk-demo). Run by scripts/test against `imagegate demo`.

const client = new OpenAI({
  baseURL: process.env.IMAGEGATE_BASE_URL,
  apiKey: process.env.IMAGEGATE_API_KEY ?? 'sk-demo',
})

const response = await client.images.generate({
  model: 'gemini-3.1-flash-image',
  prompt: 'A cozy coffee shop interior with warm lighting and bookshelves',
  size: '1024x1024',
  n: 1,
})

console.log(response.data[0].url)

// ---------------------------------------------------------------------------------------
// ADDITION (not part of the seed snippet): checks that what the snippet got is usable.
// Any failure throws, so the script exits non-zero.
// ---------------------------------------------------------------------------------------
if (!process.env.IMAGEGATE_BASE_URL) throw new Error('set IMAGEGATE_BASE_URL')

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`)
  console.log(`  ok: ${what}`)
}

const { VERSION } = await import('openai/version.mjs').catch(() => ({ VERSION: '?' }))
console.log(`checks (openai-node ${VERSION}):`)

check(response.data.length === 1, 'n=1 gives exactly one image')
const url = response.data[0].url
check(typeof url === 'string' && /^https?:\/\//.test(url), `url is http(s): ${JSON.stringify(url)}`)
const download = await fetch(url, { signal: AbortSignal.timeout(30_000) })
check(download.ok, `the url answers ${download.status}`)
const body = Buffer.from(await download.arrayBuffer())
check(body.subarray(0, 8).equals(PNG_SIGNATURE), `the url serves a PNG (${body.length} bytes)`)

const b64 = await client.images.generate({
  model: 'gemini-3.1-flash-image',
  prompt: 'A cozy coffee shop interior with warm lighting and bookshelves',
  size: '1024x1024',
  n: 1,
  response_format: 'b64_json',
})
const b64json = b64.data?.[0]?.b64_json
check(b64.data.length === 1 && typeof b64json === 'string' && b64json.length > 0,
  'response_format=b64_json gives b64_json')
check(/^[A-Za-z0-9+/]+={0,2}$/.test(b64json), 'b64_json is standard base64')
const png = Buffer.from(b64json, 'base64')
check(png.subarray(0, 8).equals(PNG_SIGNATURE), `b64_json decodes to a PNG (${png.length} bytes)`)

const models = []
for await (const model of client.models.list()) models.push(model.id)
check(models.includes('gemini-3.1-flash-image'), `models.list() lists the model: ${models}`)

for (const bad of [{ n: 0 }, { size: '123x456' }]) {
  let error = null
  try {
    await client.images.generate({
      model: 'gemini-3.1-flash-image',
      prompt: 'A cozy coffee shop interior with warm lighting and bookshelves',
      size: '1024x1024',
      n: 1,
      ...bad,
    })
  } catch (e) {
    error = e
  }
  if (error === null) throw new Error(`${JSON.stringify(bad)} was accepted; expected OpenAI.BadRequestError`)
  if (!(error instanceof OpenAI.BadRequestError)) throw error
  check(error.status === 400,
    `${JSON.stringify(bad)} throws BadRequestError with status 400: ${error.error?.message ?? error.message}`)
}

console.error('seed.mjs: all checks passed')
